"""How well the audit finds what was planted: dirty copies of a folder with a known share of
training images moved to a wrong class, test images copied into training resized and
re-encoded as JPEG, and photos of other kinds (scikit-image, scikit-learn samples) dropped into
class folders. Prints one table row per dataset and setting: precision and recall of
label_issues.csv (and precision at k = the number planted), leaks found among those planted and
other pairs listed, the rank of each planted outlier; and the same counts on the clean copy.

    python -m bench.audit_dirty footwear [--copies 5] [--backbone efficientnet_lite0]
    python -m bench.audit_dirty fashion-mnist --per-class 100 --image-size 96
    python -m bench.audit_dirty mosaic --image-size 112 --copies 3

`mosaic` is a multi-label table (bench.multilabel's Fashion-MNIST 2 x 2 mosaics, labels = the
classes shown) with one label swapped for an absent one in 5% of rows; only label issues count.

`--copies N` plants N dirty copies (seeds 0 to N-1: other images moved, leaked and dropped in)
and prints each, their mean and their lowest; `--label-features pooled` has the probes read the
pooled features.
"""

import argparse
import gzip
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from bench.multilabel import build
from src.audit import audited_images
from src.quality.findings import Images, audit_images
from src.quality.neighbours import nearest
from src.quality.outliers import outlier_scores

CONF = str(Path(__file__).resolve().parents[1] / "conf")
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def other_kinds() -> list[Image.Image]:
    """Six photos of other kinds, bundled with scikit-image and scikit-learn (no download)."""
    import skimage.data
    from sklearn.datasets import load_sample_image

    arrays = [getattr(skimage.data, n)() for n in ("astronaut", "coffee", "chelsea", "rocket")]
    arrays += [load_sample_image("china.jpg"), skimage.data.camera()]
    return [Image.fromarray(a).convert("RGB") for a in arrays]


def fashion_mnist(dst: Path, per_class: int, test_per_class: int) -> Path:
    """A Fashion-MNIST folder (Debian's dataset-fashion-mnist): training/ from the training set,
    validation/ from the test set, the first `per_class` / `test_per_class` images per class."""
    names = ["tshirt", "trouser", "pullover", "dress", "coat"]
    names += ["sandal", "shirt", "sneaker", "bag", "boot"]
    for top, stem, count in (
        ("training", "train", per_class),
        ("validation", "t10k", test_per_class),
    ):
        with gzip.open(FMNIST / f"{stem}-images-idx3-ubyte.gz") as f:
            images = np.frombuffer(f.read(), np.uint8, offset=16)
        with gzip.open(FMNIST / f"{stem}-labels-idx1-ubyte.gz") as f:
            labels = np.frombuffer(f.read(), np.uint8, offset=8)
        images = images.reshape(-1, 28, 28)
        seen = [0] * 10
        for i, y in enumerate(labels.tolist()):
            if seen[y] < count:
                folder = dst / top / names[y]
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i]).save(folder / f"{stem}{i}.png")
                seen[y] += 1
    return dst


def make_dirty(root: Path, share: float, leaks: int, seed: int = 0) -> dict[str, Any]:
    """Plant into `root` (in place): `share` of training images moved to another class, `leaks`
    validation/ images copied into training/ resized and re-encoded, six outliers. Returns the
    planted paths (relative to root)."""
    rng = random.Random(seed)
    classes = sorted(p.name for p in (root / "training").iterdir())
    train = sorted((root / "training").glob("*/*"))
    moved = []
    for path in rng.sample(train, round(share * len(train))):
        target = rng.choice([c for c in classes if c != path.parent.name])
        new = root / "training" / target / f"moved_{path.parent.name}_{path.name}"
        path.rename(new)
        moved.append(new.relative_to(root).as_posix())
    copies = []
    for i, path in enumerate(rng.sample(sorted((root / "validation").glob("*/*")), leaks)):
        with Image.open(path) as image:
            side = rng.choice([36, 44, 56, 64])
            big = image.convert("RGB").resize((side, side), Image.Resampling.LANCZOS)
        new = root / "training" / path.parent.name / f"leak{i}.jpg"
        big.save(new, "JPEG", quality=rng.choice([75, 85, 90]))
        copies.append((new.relative_to(root).as_posix(), path.relative_to(root).as_posix()))
    outliers = []
    for i, image in enumerate(other_kinds()):
        new = root / "training" / rng.choice(classes) / f"other{i}.jpg"
        image.resize((160, 160)).save(new, "JPEG", quality=90)
        outliers.append(new.relative_to(root).as_posix())
    return {"moved": moved, "copies": copies, "outliers": outliers}


def dirty_table(table: Path, share: float, seed: int = 0) -> dict[str, Any]:
    """Plant into a multi-label table (in place): in `share` of its rows one label swapped for
    one the image does not show. Returns the planted rows' image names."""
    rng = random.Random(seed)
    header, *rows = table.read_text().splitlines()
    labels = sorted({name for row in rows for name in row.split(",")[1].split()})
    moved = []
    for i in sorted(rng.sample(range(len(rows)), round(share * len(rows)))):
        path, given = rows[i].split(",")
        shown = given.split()
        shown[rng.randrange(len(shown))] = rng.choice([n for n in labels if n not in shown])
        rows[i] = f"{path},{' '.join(sorted(shown))}"
        moved.append(path)
    table.write_text("\n".join([header, *rows]) + "\n")
    return {"moved": moved, "copies": [], "outliers": []}


def features_of(
    root: Path, backbone: str, image_size: int, work: Path, label_features: str
) -> tuple[Images, dict[str, Any], Path]:
    """The audited images of `root` with their features (cached under `work`), the audit
    settings, the hash cache."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(
            "audit",
            [
                f"backbone={backbone}",
                "data=imagefolder",
                f"data.root={root}",
                f"image_size={image_size}",
                f"cache_dir={work / 'cache'}",
                f"data.scan_cache={work / 'scan'}",
                f"audit.label_features={label_features}",
                "output_dir=unused",
            ],
        )
    images, _ = audited_images(cfg, instantiate(cfg.data), torch.device("cpu"), False)
    return images, OmegaConf.to_container(cfg.audit, resolve=True), work / "hashes.json"


def score(
    images: Images, settings: dict, hashes: Path, planted: dict | None, mosaic: bool = False
) -> dict[str, Any]:
    """One table row: what the audit listed and, with `planted`, how much of it was planted
    (`mosaic`: a table's rows, named by their image's file name)."""
    findings = audit_images(images, settings, hashes)
    found = findings.rows
    issues = [Path(r["path"]).name if mosaic else r["path"] for r in found["label_issues"]]
    pairs = {(r["path_a"], r["path_b"]) for r in found["duplicates"]}
    pairs |= {(b, a) for a, b in pairs}
    leaks = [r for r in found["duplicates"] if (r["split_a"] == "test") != (r["split_b"] == "test")]
    row = {
        "issues": len(issues),
        "pairs": len(found["duplicates"]),
        "leaks": len(leaks),
        "outliers": len(found["outliers"]),
        "agreement": findings.label_agreement,
    }
    if planted:
        moved = set(planted["moved"])
        hits = sum(p in moved for p in issues)
        k = len(moved)
        row |= {
            "precision": hits / max(1, len(issues)),
            "recall": hits / k,
            "p@k": sum(p in moved for p in issues[:k]) / k,
            "leaks_found": sum(c in pairs for c in planted["copies"]),
            "other_pairs": len(found["duplicates"]) - sum(c in pairs for c in planted["copies"]),
        }
        if mosaic:
            return row
        order = outlier_scores(nearest(images.features, settings["neighbours"])[0]).argsort(
            descending=True
        )
        names = [images.name(int(i)) for i in order]
        row["outlier_ranks"] = sorted(names.index(p) + 1 for p in planted["outliers"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset", choices=["footwear", "fashion-mnist", "mosaic"])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--mosaics", type=int, default=600)
    parser.add_argument("--work", type=Path, default=Path("/tmp/audit-bench"))
    parser.add_argument("--l2", type=float, nargs="*", default=[])
    parser.add_argument("--copies", type=int, default=1)
    parser.add_argument("--label-features", choices=["stages", "pooled"], default="stages")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows: dict[float, list[dict[str, Any]]] = {}
    for state in ["clean"] + [f"dirty{seed}" for seed in range(args.copies)]:
        root = args.work / args.dataset / state
        record = args.work / args.dataset / f"{state}-planted.json"
        if not record.is_file():  # made once: a rebuilt folder would need its features again
            shutil.rmtree(root, ignore_errors=True)
            if args.dataset == "footwear":
                shutil.copytree("data/footwear", root)
            elif args.dataset == "mosaic":
                build(root, args.mosaics)
            else:
                fashion_mnist(root, args.per_class, args.per_class // 5)
            planted = None
            if state != "clean" and args.dataset == "mosaic":
                planted = dirty_table(root / "labels.csv", 0.05, int(state[5:]))
            elif state != "clean":
                planted = make_dirty(root, 0.05, 10, int(state[5:]))
            record.write_text(json.dumps(planted))
        planted = json.loads(record.read_text())
        if planted:
            planted["copies"] = [tuple(pair) for pair in planted["copies"]]
        start = time.perf_counter()
        images, settings, hashes = features_of(
            root / "labels.csv" if args.dataset == "mosaic" else root,
            args.backbone,
            args.image_size,
            args.work / args.dataset / f"{state}-work",
            args.label_features,
        )
        took = time.perf_counter() - start
        print(f"{args.dataset} {state}: {len(images.paths)} images, features {took:.1f} s")
        for l2 in args.l2 or [settings["l2"]]:
            start = time.perf_counter()
            row = score(images, settings | {"l2": l2}, hashes, planted, args.dataset == "mosaic")
            print(f"  l2={l2:g} audit {time.perf_counter() - start:.1f} s: {row}")
            if planted:
                rows.setdefault(l2, []).append(row)
    for l2, dirty in rows.items():
        mean = {k: round(float(np.mean([r[k] for r in dirty])), 3) for k in ("precision", "recall")}
        low = {k: round(min(r[k] for r in dirty), 3) for k in ("precision", "recall")}
        print(f"l2={l2:g} over {len(dirty)} dirty copies: mean {mean}, lowest {low}")


if __name__ == "__main__":
    main()
