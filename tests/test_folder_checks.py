"""Messy image folders: each layout problem is one clear UserError, odd images are handled."""

import io
import logging
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from src.data.images import decode
from src.data.module import ImageFolderData
from src.run.errors import UserError
from tests.conftest import make_folder


def data(root: Path, val_fraction: float = 0.3, **kwargs) -> ImageFolderData:
    """The data module of `root` at 16 px (a class of 3 images splits 1 + 1 + 1)."""
    return ImageFolderData(str(root), image_size=16, val_fraction=val_fraction, **kwargs)


def broken(kind: str) -> bytes:
    """The first half of a noisy 32 px image file of format `kind` (truncated)."""
    pixels = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, kind)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def png16(path: Path, pixels: np.ndarray) -> None:
    """Write (H, W) or (H, W, 3) uint16 pixels as a 16-bit PNG (Pillow cannot write RGB at 16)."""
    height, width = pixels.shape[:2]
    colour = 2 if pixels.ndim == 3 else 0
    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_root_missing(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"data.root=.*nowhere is not a folder.*Fix: data.root="):
        data(tmp_path / "nowhere")


def test_root_without_training(tmp_path: Path) -> None:
    (tmp_path / "shoes").mkdir()
    with pytest.raises(UserError, match=r"no training folder .*shoes/training\. Fix:"):
        data(tmp_path / "shoes")


def test_fewer_than_two_classes(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", per_class=2)
    for extra in ("class_1", "class_2"):
        shutil.rmtree(root / "training" / extra)
    with pytest.raises(UserError, match=r"1 class folder\(s\) \['class_0'\].*at least 2"):
        data(root)


def test_class_folder_without_images_is_named(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", per_class=2)
    (root / "training" / "empty_class").mkdir()
    (root / "training" / "empty_class" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match=r"no images in the class folder\(s\) .*empty_class\. Fix"):
        data(root)


def test_class_only_in_validation(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", per_class=2, validation=1)
    (root / "validation" / "ghost").mkdir()
    with pytest.raises(UserError, match=r"classes that .*training lacks: ghost\. Fix"):
        data(root)


def test_non_images_warned_with_a_count_and_junk_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_folder(tmp_path / "d", per_class=4, validation=1)
    for junk in (".DS_Store", "Thumbs.db", "._image0.png", "desktop.ini"):
        (root / "training" / "class_0" / junk).write_bytes(b"\0\1junk")
    (root / "training" / "class_0" / "notes.txt").write_text("x")
    (root / "training" / "class_1" / "clip.gif").write_bytes(b"GIF89a")
    (root / "training" / "labels.csv").write_text("x")
    with caplog.at_level(logging.WARNING, logger="src.data"):
        folder = data(root)
    assert "ignoring 3 file(s) that are not images" in caplog.text
    assert "training/class_0/notes.txt" in caplog.text and "DS_Store" not in caplog.text
    everything = [p for split in folder.splits().values() for p in split.paths]
    assert all(p.suffix == ".png" and not p.name.startswith(".") for p in everything)
    assert len(folder.train_split.paths) + len(folder.val_split.paths) == 12


def test_bad_images_fail_names_them_at_most_20(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", per_class=4)
    (root / "training" / "class_0" / "cut.jpg").write_bytes(broken("JPEG"))
    (root / "training" / "class_1" / "cut.png").write_bytes(broken("PNG"))
    (root / "training" / "class_1" / "empty.png").write_bytes(b"")
    for i in range(22):
        (root / "training" / "class_2" / f"text{i:02d}.jpg").write_text("not a picture")
    with pytest.raises(UserError) as caught:
        data(root)
    message = str(caught.value)
    assert message.startswith("25 unreadable image(s) in ")
    assert "class_0/cut.jpg (" in message
    assert "class_1/cut.png (" in message and "class_1/empty.png (empty file)" in message
    assert "text00.jpg (not an image)" in message
    assert message.count("(not an image)") == 17  # 20 named in all, then a count
    assert "and 5 more. Fix: replace or delete them, or data.on_bad_image=skip" in message


def test_bad_images_skip_trains_on_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_folder(tmp_path / "d", per_class=4, validation=2)
    (root / "training" / "class_0" / "cut.jpg").write_bytes(broken("JPEG"))
    (root / "validation" / "class_2" / "cut.webp").write_bytes(broken("WEBP"))
    with caplog.at_level(logging.WARNING, logger="src.data"):
        folder = data(root, on_bad_image="skip")
    assert "skipping 2 unreadable image(s)" in caplog.text and "cut.webp" in caplog.text
    everything = [p for split in folder.splits().values() for p in split.paths]
    assert len(everything) == 12 + 6 and not any(p.name.startswith("cut") for p in everything)
    folder.setup()
    assert len(folder.datasets["train"]) + len(folder.datasets["val"]) == 12


def test_all_images_of_a_class_unreadable_under_skip(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", per_class=2)
    for path in (root / "training" / "class_1").iterdir():
        path.write_text("gone")
    with pytest.raises(
        UserError, match=r"only unreadable images in the class folder\(s\) .*class_1"
    ):
        data(root, on_bad_image="skip")


def test_decompression_bomb_is_a_bad_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_folder(tmp_path / "d", per_class=2)
    Image.new("RGB", (400, 300)).save(root / "training" / "class_0" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # 400 x 300 is over twice that
    with pytest.raises(UserError, match=r"class_0/huge.png \(Image size \(120000 pixels\) exceeds"):
        data(root)


def test_too_small_images_are_used_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_folder(tmp_path / "d", per_class=3)
    Image.new("RGB", (1, 1), (9, 200, 9)).save(root / "training" / "class_1" / "dot.png")
    with caplog.at_level(logging.WARNING, logger="src.data"):
        folder = data(root)
    assert "1 image(s) smaller than 8 px" in caplog.text and "dot.png" in caplog.text
    assert (
        decode(root / "training" / "class_1" / "dot.png", 16)
        == torch.tensor([9, 200, 9]).view(3, 1, 1)
    ).all()
    assert any(p.name == "dot.png" for split in folder.splits().values() for p in split.paths)


def test_sixteen_bit_images_scale_to_eight_bits(tmp_path: Path) -> None:
    grey = np.full((8, 8), 40_000, dtype=np.uint16)
    png16(tmp_path / "grey.png", grey)
    assert Image.open(tmp_path / "grey.png").mode == "I;16"
    assert (decode(tmp_path / "grey.png", 4) == 40_000 // 256).all()
    rgb = np.zeros((8, 8, 3), dtype=np.uint16)
    rgb[..., 0], rgb[..., 2] = 65_535, 32_768
    png16(tmp_path / "rgb.png", rgb)
    assert decode(tmp_path / "rgb.png", 4)[:, 0, 0].tolist() == [255, 0, 128]


@pytest.mark.parametrize("kind", ["png", "webp"])
def test_animated_image_gives_its_first_frame(tmp_path: Path, kind: str) -> None:
    red, blue = Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))
    red.save(tmp_path / f"anim.{kind}", save_all=True, append_images=[blue], lossless=True)
    assert Image.open(tmp_path / f"anim.{kind}").n_frames == 2
    assert decode(tmp_path / f"anim.{kind}", 8)[:, 4, 4].tolist() == [255, 0, 0]


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    upright = Image.new("RGB", (40, 40), (255, 0, 0))
    upright.paste((0, 0, 255), (0, 20, 40, 40))  # red top, blue bottom
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.jpg", exif=exif)
    image = decode(tmp_path / "phone.jpg", 8).int()
    assert image[0, 1, 4] > 200 and image[2, 1, 4] < 50  # top row red
    assert image[2, 6, 4] > 200 and image[0, 6, 4] < 50  # bottom row blue


def test_a_class_too_small_for_the_split_is_named_with_its_count(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", per_class=4)
    for name in ("image0.png", "image1.png"):
        (root / "training" / "class_1" / name).unlink()
    with pytest.raises(UserError) as caught:
        data(root, val_fraction=0.1, test_fraction=0.1)
    message = str(caught.value)
    assert "\n" not in message
    assert "the class(es) class_1 (2 image(s)) without an image in some split" in message
    assert "class_0" not in message and "class_2" not in message
    assert "Fix: add images to them, or other fractions" in message
    assert len(data(root, val_fraction=0.1, test_fraction=0).train_split.paths) == 7  # 3 + 1 + 3


def test_a_class_too_small_for_the_folds_is_named(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", per_class=4, validation=1)
    with pytest.raises(UserError, match=r"data.folds=5 leaves the class\(es\) class_0 \(4 image"):
        data(root, folds=5)


def test_validation_folder_lacking_a_class(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", per_class=3, validation=1)
    shutil.rmtree(root / "validation" / "class_2")
    with pytest.raises(UserError, match=r"no images in .*validation/class_2: the test set"):
        data(root)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"test_fraction": 1.0}, "data.test_fraction=1.0 is invalid: it must be a number from 0"),
        ({"test_fraction": -0.1}, "data.test_fraction=-0.1 is invalid"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "leave no training images. Fix:"),
        ({"folds": 1}, "data.folds=1 is invalid: it must be null or a whole number, at least 2"),
        ({"folds": 3, "fold": 3}, "data.fold=3 is invalid: it must be a whole number from 0 to 2"),
        ({"fold": 1}, r"data.fold=1 is invalid: .* from 0 to 0 \(data.folds=null\)"),
        ({"folds": True}, "data.folds=true is invalid"),
        ({"in_memory": "maybe"}, "data.in_memory=maybe is invalid: it must be auto, true or false"),
        ({"num_workers": -1}, "data.num_workers=-1 is invalid: it must be auto or a whole number"),
        ({"memory_limit_gb": 0}, "data.memory_limit_gb=0 is invalid: it must be null or a number"),
    ],
)
def test_invalid_settings_are_one_line_errors(tmp_path: Path, settings: dict, message: str):
    root = make_folder(tmp_path / "d", per_class=3)
    with pytest.raises(UserError, match=message) as caught:
        data(root, **settings)
    assert "\n" not in str(caught.value) and "Fix: " in str(caught.value)
