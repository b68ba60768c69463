"""data.resize (squash, pad, crop) and the layouts end to end: train, eval, predict, export."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import MobileNet_V2_Weights

from src.data.images import read_rgb
from src.eval import evaluate
from src.export import export
from src.model.inference import logits_of_files
from src.model.network import load_model
from src.predict import predict
from src.run.errors import UserError
from src.train import train
from tests.conftest import (
    COLOURS,
    calibrated_mobilenet_v2,
    command_cfg,
    compose_cfg,
    make_folder,
    tiny_overrides,
)


def save(pixels: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def two_to_one(path: Path) -> Path:
    """A 64 x 32 image: its left half red, its right half blue."""
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :32] = (255, 0, 0)
    pixels[:, 32:] = (0, 0, 255)
    return save(pixels, path)


def test_pad_keeps_the_aspect_ratio(tmp_path: Path) -> None:
    image = read_rgb(two_to_one(tmp_path / "wide.png"), 32, "pad").permute(1, 2, 0)
    border = torch.tensor([128, 0, 128], dtype=torch.uint8)  # the image's mean colour
    content = image[8:24]
    assert (image[:8] == border).all() and (image[24:] == border).all()
    assert (content[:, :14] == torch.tensor([255, 0, 0], dtype=torch.uint8)).all()
    assert (content[:, 18:] == torch.tensor([0, 0, 255], dtype=torch.uint8)).all()


def test_squash_is_the_published_resize(tmp_path: Path) -> None:
    path = two_to_one(tmp_path / "wide.png")
    with Image.open(path) as image:
        want = np.asarray(image.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
    assert torch.equal(read_rgb(path, 32), torch.from_numpy(want).permute(2, 0, 1))
    assert torch.equal(read_rgb(path, 32, "squash"), read_rgb(path, 32))


def test_crop_is_the_backbones_eval_transform(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = save(rng.integers(0, 256, (40, 70, 3)), tmp_path / "noise.png")
    preset = MobileNet_V2_Weights.IMAGENET1K_V1.transforms(crop_size=32, resize_size=32)
    with Image.open(path) as image:
        want = preset(image.convert("RGB"))
    ours = read_rgb(path, 32, "crop").float() / 255
    mean, std = torch.tensor(preset.mean).view(3, 1, 1), torch.tensor(preset.std).view(3, 1, 1)
    assert torch.allclose((ours - mean) / std, want, atol=1e-5)


def test_unknown_resize_is_one_line(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", per_class=3)
    from src.data.module import ImageFolderData

    with pytest.raises(UserError, match=r"data.resize=stretch is unknown. Fix: data.resize=squash"):
        ImageFolderData(str(root), resize="stretch")


# --- end to end ---------------------------------------------------------------------------------


def wide_folder(root: Path, per_class: int = 6) -> Path:
    """3 classes of noisy solid-colour 48 x 24 images, as train/<class>/ and test/<class>/."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", 2)):
        for c, colour in enumerate(COLOURS):
            for i in range(count):
                noise = rng.integers(-30, 30, (24, 48, 3))
                save(np.clip(np.array(colour) + noise, 0, 255), root / split / f"c{c}" / f"{i}.png")
    return root


def run_result(root: Path, weights: Path | str, out: Path, *extra: str) -> dict:
    """Train the tiny MobileNetV2 of `tiny_overrides` on `root`; its result.json."""
    train(compose_cfg([*tiny_overrides(root, weights), *extra], out))
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow
def test_every_layout_trains_with_the_same_metrics(tmp_path: Path, one_thread) -> None:
    published = make_folder(tmp_path / "pub", per_class=8)
    weights = calibrated_mobilenet_v2(published, tmp_path / "w.pth")
    shutil.copytree(published / "training", tmp_path / "classes")
    shutil.copytree(published / "training", tmp_path / "splits" / "train")
    rows = [
        f"{p.relative_to(published).as_posix()},{p.parent.name}"
        for p in sorted(published.glob("training/*/*.png"))
    ]
    (published / "labels.csv").write_text("\n".join(["path,class", *rows]) + "\n")
    roots = [published, tmp_path / "classes", tmp_path / "splits", published / "labels.csv"]
    results = [
        run_result(r, weights, tmp_path / f"run{i}", "head_fit=probe") for i, r in enumerate(roots)
    ]
    for key in ("test/acc", "test/loss", "val/acc"):
        assert len({r[key] for r in results}) == 1, key
    assert results[0]["test/acc"] > 0.5  # learned: 3 classes, chance is 1/3


def test_pad_checkpoint_through_eval_predict_and_export(tmp_path: Path, one_thread) -> None:
    root = wide_folder(tmp_path / "wide")
    weights = calibrated_mobilenet_v2(make_folder(tmp_path / "pub"), tmp_path / "w.pth")
    run_result(root, weights, tmp_path / "run", "data.resize=pad")
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    model = load_model(ckpt)
    assert model.resize == "pad"
    metrics = evaluate(
        command_cfg(
            "eval",
            [f"ckpt_path={ckpt}", "data=imagefolder", f"data.root={root}", "logger=none"],
            tmp_path / "eval",
        )  # fmt: skip
    )
    assert metrics["n_images"] == 6 and metrics["test_source"] == "test/"
    table = root / "test.csv"
    images = sorted(root.glob("test/*/*.png"))
    table.write_text(
        "file,label\n" + "".join(f"{p.relative_to(root)},{p.parent.name}\n" for p in images)
    )
    records = predict(command_cfg("predict", [f"ckpt_path={ckpt}", f"inputs={table}"],
                                  tmp_path / "predict"))  # fmt: skip
    assert [r["true"] for r in records] == [p.parent.name for p in images]
    info = export(command_cfg("export", [f"ckpt_path={ckpt}", "format=torchscript"],
                              tmp_path / "export"))  # fmt: skip
    assert info["input"]["resize"] == "pad" and "mean colour" in info["input"]["preprocessing"]
    exported = torch.jit.load(tmp_path / "export" / "model.pt")
    batch = torch.stack([read_rgb(p, 32, info["input"]["resize"]) for p in images])
    expected, errors = logits_of_files(model, images, torch.device("cpu"))
    assert not errors
    with torch.inference_mode():
        assert torch.allclose(exported(batch), expected, atol=1e-4)
    squashed = torch.stack([read_rgb(p, 32) for p in images])
    assert not torch.allclose(model(squashed), expected, atol=1e-4)  # pad made a difference


def test_a_checkpoint_without_resize_means_squash(tmp_path: Path, one_thread) -> None:
    root = make_folder(tmp_path / "pub", per_class=4)
    run_result(root, "null", tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)
    assert state["hyper_parameters"]["resize"] == "squash"
    del state["hyper_parameters"]["resize"]
    torch.save(state, tmp_path / "old.ckpt")
    assert load_model(tmp_path / "old.ckpt").resize == "squash"
