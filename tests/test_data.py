"""The published folder layout, the split, and image formats."""

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from src.data import ImageFolderData, Split, decode, stratified_split
from tests.conftest import make_folder


def test_split_is_stratified_seeded_and_published_sized():
    split = Split(
        [Path(f"{c}/{i}.png") for c in range(6) for i in range(249)],
        [c for c in range(6) for _ in range(249)],
    )
    train, val = stratified_split(split, 0.1, seed=0)
    assert (len(train.labels), len(val.labels)) == (1344, 150)
    assert all(val.labels.count(c) == 25 for c in range(6))
    assert not set(train.paths) & set(val.paths)
    again, _ = stratified_split(split, 0.1, seed=0)
    other, _ = stratified_split(split, 0.1, seed=1)
    assert again.paths == train.paths and other.paths != train.paths


def test_validation_folder_is_the_test_set(image_root):
    data = ImageFolderData(str(image_root), image_size=16, val_fraction=0.25)
    assert data.classes == ["class_0", "class_1", "class_2"]
    assert not data.test_is_val
    assert len(data.test_split.paths) == 12
    assert all("validation" in str(p) for p in data.test_split.paths)
    assert (len(data.train_split.paths), len(data.val_split.paths)) == (18, 6)


def test_without_validation_folder_test_equals_val_with_a_warning(tmp_path, caplog):
    data = ImageFolderData(
        str(make_folder(tmp_path, per_class=4)), image_size=16, val_fraction=0.25
    )
    assert data.test_is_val and data.test_split is data.val_split
    with caplog.at_level(logging.WARNING):
        data.setup()
    assert "test set is the validation split" in caplog.text
    images, labels = next(iter(data.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 16, 16)


def test_extensions_in_any_case_and_other_files_ignored(tmp_path):
    for c in ("a", "b"):
        folder = tmp_path / "training" / c
        folder.mkdir(parents=True)
        for ext, fmt in (
            (".JPG", "JPEG"),
            (".jpeg", "JPEG"),
            (".Png", "PNG"),
            (".bmp", "BMP"),
            (".WebP", "WEBP"),
        ):
            Image.new("RGB", (8, 8), "red").save(folder / f"x{ext}", format=fmt)
        (folder / "notes.txt").write_text("not an image")
    data = ImageFolderData(str(tmp_path), image_size=8, val_fraction=0.2)
    paths = data.train_split.paths + data.val_split.paths
    assert len(paths) == 10
    assert not any(p.suffix == ".txt" for p in paths)


@pytest.mark.parametrize(
    ("mode", "colour", "fmt"),
    [
        ("L", 128, "PNG"),
        ("P", 3, "PNG"),
        ("RGBA", (255, 0, 0, 255), "PNG"),
        ("CMYK", (0, 255, 255, 0), "JPEG"),
        ("I;16", 65535, "PNG"),
    ],
)
def test_any_mode_decodes_to_rgb_uint8_at_the_requested_size(tmp_path, mode, colour, fmt):
    path = tmp_path / f"image.{fmt.lower()}"
    Image.new(mode, (20, 10), colour).save(path, format=fmt)
    image = decode(path, 12)
    assert image.shape == (3, 12, 12) and image.dtype == torch.uint8
    if mode == "RGBA":
        assert image[:, 5, 5].tolist() == [255, 0, 0]
    if mode == "I;16":
        assert image[:, 5, 5].tolist() == [255, 255, 255]


def test_resize_is_a_square_squash_without_crop(tmp_path):
    path = tmp_path / "wide.png"
    image = Image.new("RGB", (40, 10), "blue")
    image.paste((255, 0, 0), (0, 0, 4, 10))  # red strip on the left tenth
    image.save(path)
    decoded = decode(path, 20)
    assert decoded[0, 10, 0] > 200  # still there: nothing was cropped
