"""Compare "unknown" scores (max softmax, energy, k-NN cosine distance) and calibration on a
frozen EfficientNet-Lite0 trained on the embedded footwear data, against images of other kinds:
Fashion-MNIST's non-footwear classes (Debian's dataset-fashion-mnist), scikit-learn's 8x8 digits,
scikit-image's 25x25 LFW faces and 64 px crops of scikit-image's and scikit-learn's photos.

    PYTHONPATH=$PWD python bench/ood.py [--ckpt outputs/.../best.ckpt]

Without --ckpt it trains one (defaults only: `python -m src.train backbone=efficientnet_lite0`).
Prints the comparison table (Markdown), the k and bank-size sweeps of the k-NN score, the ECE
before and after calibration and the bytes the OOD data adds to the checkpoint.
"""

import argparse
import gzip
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from src.data.module import ImageFolderData
from src.model.inference import logits_of_files
from src.model.network import load_model
from src.trust.calibration import expected_calibration_error
from src.trust.ood import feature_bank, scores, threshold

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
FASHION_LABELS = FASHION.with_name("t10k-labels-idx1-ubyte.gz")
OTHER_FASHION = (0, 1, 2, 3, 4, 6, 8)  # T-shirt, trouser, pullover, dress, coat, shirt, bag
PER_SET = 200


def fashion_others() -> list[np.ndarray]:
    """The first PER_SET test images of Fashion-MNIST's non-footwear classes, in turn."""
    images = np.frombuffer(gzip.decompress(FASHION.read_bytes())[16:], np.uint8).reshape(-1, 28, 28)
    labels = np.frombuffer(gzip.decompress(FASHION_LABELS.read_bytes())[8:], np.uint8)
    picked = np.flatnonzero(np.isin(labels, OTHER_FASHION))[:PER_SET]
    return list(images[picked])


def digits() -> list[np.ndarray]:
    """scikit-learn's 8x8 digits (0-16 ink) as 0-255 images."""
    from sklearn.datasets import load_digits

    return [(d * 255 / 16).astype(np.uint8) for d in load_digits().images[:PER_SET]]


def faces() -> list[np.ndarray]:
    """scikit-image's 25x25 LFW faces."""
    import skimage.data

    return [(f * 255).astype(np.uint8) for f in skimage.data.lfw_subset()[:PER_SET]]


def photo_crops() -> list[np.ndarray]:
    """Random 64 px crops of the bundled photos (seeded)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    names = ["astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "page"]
    photos = [getattr(skimage.data, n)() for n in names] + load_sample_images().images
    rng = np.random.default_rng(0)
    crops = []
    for i in range(PER_SET):
        photo = photos[i % len(photos)]
        y, x = rng.integers(0, photo.shape[0] - 64), rng.integers(0, photo.shape[1] - 64)
        crops.append(photo[y : y + 64, x : x + 64])
    return crops


def save(images: list[np.ndarray], folder: Path) -> list[Path]:
    """PNG files of `images` (the commands read files)."""
    folder.mkdir(parents=True)
    paths = [folder / f"{i}.png" for i in range(len(images))]
    for image, path in zip(images, paths, strict=True):
        Image.fromarray(image).save(path)
    return paths


def train(out: Path) -> Path:
    """A default run on the embedded data; its best checkpoint."""
    subprocess.run(
        [sys.executable, "-m", "src.train", "backbone=efficientnet_lite0", "trainer=cpu",
         "logger=none", f"hydra.run.dir={out}", f"cache_dir={out / 'cache'}"],
        check=True, cwd=ROOT,
    )  # fmt: skip
    return out / "checkpoints" / "best.ckpt"


def outputs(model, paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, logits) of image files."""
    classes = len(model.classes)

    def both(images: torch.Tensor) -> torch.Tensor:
        features = model.features(images)
        return torch.cat([model.head(features), features], 1)

    width = classes + model.head.in_features
    rows, errors = logits_of_files(model, paths, torch.device("cpu"), 64, both, width)
    assert not errors, errors
    return rows[:, classes:], rows[:, :classes]


def auroc(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """AUROC of telling `outside` (higher score) from `inside`."""
    truth = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    return float(roc_auc_score(truth, torch.cat([inside, outside]).numpy()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, help="a best.ckpt of the default run")
    args = parser.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="bench-ood-"))
    ckpt = args.ckpt or train(work / "run")
    model = load_model(ckpt)
    trust = model.record["trust"]
    temperature, coverage = trust["temperature"], trust["ood"]["coverage"]
    data = ImageFolderData.from_record(
        str(ROOT / "data/footwear"), model.record["split"], image_size=model.image_size
    )
    splits = {name: outputs(model, s.paths) for name, s in data.splits().items()}
    others = {
        "fashion (7 other classes)": fashion_others(),
        "digits 8x8": digits(),
        "faces 25x25": faces(),
        "photo crops": photo_crops(),
    }
    held = {
        n: outputs(model, save(imgs, work / str(i))) for i, (n, imgs) in enumerate(others.items())
    }
    train_features = splits["train"][0]

    def score(kind: str, pair: tuple[torch.Tensor, torch.Tensor], k: int = 5, bank=None):
        bank = feature_bank(train_features, None) if bank is None else bank
        return scores(kind, pair[1], temperature, pair[0], bank, k)

    names = list(held)
    print(
        f"checkpoint {ckpt}; temperature {temperature:.3f}; threshold keeps {coverage:.0%} of val"
    )
    print(f"| score | AUROC {' / '.join(names)} | test flagged | other kinds flagged |")
    print("| --- | --- | --- | --- |")
    for kind, k, bank in (
        [("msp", 5, None), ("energy", 5, None)]
        + [("knn", k, None) for k in (1, 5, 10, 20)]
        + [("knn", 5, feature_bank(train_features, n)) for n in (50, 100, 300)]
    ):
        cut = threshold(score(kind, splits["val"], k, bank), coverage)
        test = score(kind, splits["test"], k, bank)
        outside = {n: score(kind, held[n], k, bank) for n in names}
        label = (
            kind
            if kind != "knn"
            else f"knn k={k}" + (f", {len(bank)} rows" if bank is not None else "")
        )
        print(
            f"| {label} | {' / '.join(f'{auroc(test, o):.2f}' for o in outside.values())} "
            f"| {float((test > cut).float().mean()):.1%} "
            f"| {' / '.join(f'{float((o > cut).float().mean()):.0%}' for o in outside.values())} |"
        )
    labels = torch.tensor(data.test_split.labels)
    logits = splits["test"][1]
    before = expected_calibration_error(logits.softmax(1), labels)
    after = expected_calibration_error((logits / temperature).softmax(1), labels)
    print(f"test ECE (15 bins): {before:.4f} at T=1, {after:.4f} at T={temperature:.3f}")
    bank = trust["ood"].get("features")
    if bank is not None:
        print(
            f"OOD data in the checkpoint: {bank.shape[0]} x {bank.shape[1]} float16 = "
            f"{bank.numel() * 2 / 1e6:.2f} MB (+ {len(trust['ood']['val_scores'])} val scores)"
        )


if __name__ == "__main__":
    main()
