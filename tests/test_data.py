"""The published folder layout, the train/val/test split and K folds, and image formats."""

import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from src.data.folder import Split
from src.data.images import decode
from src.data.module import ImageFolderData
from src.data.splits import holdout_split, kfold_split
from src.run.errors import UserError
from tests.conftest import make_folder

CLASSES = [str(c) for c in range(6)]


def published() -> Split:
    """The article's shoe set as file names: 6 classes of 249 images."""
    return Split(
        [Path(f"{c}/{i}.png") for c in range(6) for i in range(249)],
        [c for c in range(6) for _ in range(249)],
    )


def old_stratified_split(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """The published 90/10 split as it was written before the test split (a reference)."""
    generator = torch.Generator().manual_seed(seed)
    first, second = Split([], []), Split([], [])
    for label in sorted(set(split.labels)):
        indices = [i for i, y in enumerate(split.labels) if y == label]
        order = torch.randperm(len(indices), generator=generator).tolist()
        for rank, position in enumerate(order):
            part = second if rank < round(len(indices) * fraction) else first
            part.paths.append(split.paths[indices[position]])
            part.labels.append(label)
    return first, second


def labels_of(split: Split, indices: list[int]) -> Counter:
    return Counter(split.labels[i] for i in indices)


def test_holdout_split_is_stratified_disjoint_seeded_and_covers_training():
    split = published()
    parts = holdout_split(split, CLASSES, 0.1, 0.1, seed=0)
    assert {name: len(ids) for name, ids in parts.items()} == {
        "train": 6 * 199,
        "val": 6 * 25,
        "test": 6 * 25,
    }
    assert (
        labels_of(split, parts["val"])
        == labels_of(split, parts["test"])
        == Counter({c: 25 for c in range(6)})
    )
    everything = parts["train"] + parts["val"] + parts["test"]
    assert sorted(everything) == list(range(len(split.paths)))  # disjoint and covering
    assert holdout_split(split, CLASSES, 0.1, 0.1, seed=0) == parts
    assert holdout_split(split, CLASSES, 0.1, 0.1, seed=1)["test"] != parts["test"]


def test_test_fraction_zero_is_the_published_90_10_split():
    split = published()
    parts = holdout_split(split, CLASSES, 0.1, 0.0, seed=42)
    train, val = old_stratified_split(split, 0.1, seed=42)
    assert [split.paths[i] for i in parts["train"]] == train.paths  # same images, same order
    assert [split.paths[i] for i in parts["val"]] == val.paths
    assert parts["test"] == []


def test_rounding_never_leaves_a_split_without_a_class():
    split = Split([Path(f"{c}/{i}") for c in range(2) for i in range(4)], [0] * 4 + [1] * 4)
    parts = holdout_split(split, CLASSES[:2], 0.1, 0.1, seed=0)  # 0.4 of an image rounds to 0
    for ids in parts.values():
        assert set(labels_of(split, ids)) == {0, 1}


def test_validation_folder_is_the_test_set(image_root):
    data = ImageFolderData(str(image_root), image_size=16, val_fraction=0.25)
    assert data.classes == ["class_0", "class_1", "class_2"]
    assert not data.test_is_val
    assert len(data.test_split.paths) == 12
    assert all(p.parent.parent.name == "validation" for p in data.test_split.paths)
    assert (len(data.train_split.paths), len(data.val_split.paths)) == (18, 6)
    assert not {p.parent.parent.name for p in data.train_split.paths + data.val_split.paths} - {
        "training"
    }


def test_without_validation_folder_training_splits_three_ways(tmp_path):
    root = make_folder(tmp_path / "d", per_class=10)
    data = ImageFolderData(str(root), image_size=16, val_fraction=0.2, test_fraction=0.1)
    splits = data.splits()
    assert not data.test_is_val and data.test_split is not data.val_split
    assert {name: len(s.paths) for name, s in splits.items()} == {"train": 21, "val": 6, "test": 3}
    paths = [set(s.paths) for s in splits.values()]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])
    assert set.union(*paths) == set((root / "training").rglob("*.png"))
    for split in splits.values():
        assert Counter(split.labels) == Counter({c: len(split.paths) // 3 for c in range(3)})
        assert all(
            data.classes[y] == p.parent.name for p, y in zip(split.paths, split.labels, strict=True)
        )
    again = ImageFolderData(str(root), image_size=16, val_fraction=0.2, test_fraction=0.1)
    other = ImageFolderData(str(root), image_size=16, val_fraction=0.2, test_fraction=0.1, seed=1)
    assert again.splits() == splits and other.test_split.paths != data.test_split.paths
    images, labels = next(iter(data.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 16, 16)


def test_test_fraction_zero_tests_on_val_with_a_warning(tmp_path, caplog):
    root = make_folder(tmp_path / "d", per_class=4)
    with caplog.at_level(logging.WARNING, logger="src.data"):
        data = ImageFolderData(str(root), image_size=16, val_fraction=0.25, test_fraction=0)
    assert data.test_is_val and data.test_split is data.val_split
    assert "test set is the validation split" in caplog.text
    assert "images that chose the checkpoint" in caplog.text
    data.setup()
    assert data.datasets["test"] is data.datasets["val"]
    assert data.split_indices()["test"] == data.split_indices()["val"]


def test_all_images_once_and_split_indices_give_each_split(image_root):
    data = ImageFolderData(str(image_root), image_size=16, folds=3, fold=1)
    everything = data.all_images()
    assert len(everything) == len(set(everything)) == 24 + 12
    assert set(everything) == set(image_root.rglob("*.png"))
    for name, indices in data.split_indices().items():
        assert [everything[i] for i in indices] == data.splits()[name].paths


def test_split_record_hashes_files_and_check_split_refuses_another_split(tmp_path):
    root = make_folder(tmp_path / "d", per_class=10)
    data = ImageFolderData(str(root), image_size=16, seed=3)
    record = data.split_record()
    assert {k: record[k] for k in ("seed", "val_fraction", "test_fraction", "folds", "fold")} == {
        "seed": 3,
        "val_fraction": 0.1,
        "test_fraction": 0.1,
        "folds": None,
        "fold": 0,
    }
    assert {name: s["count"] for name, s in record["splits"].items()} == {
        "train": 24,
        "val": 3,
        "test": 3,
    }
    data.check_split(record)  # itself: no error
    moved = shutil.copytree(root, tmp_path / "elsewhere")  # relative paths: same split anywhere
    assert ImageFolderData(str(moved), image_size=16, seed=3).split_record() == record

    with pytest.raises(UserError, match=r"the train split .* Fix: .*data.seed=3 ") as caught:
        ImageFolderData(str(root), image_size=16, seed=4).check_split(record)
    assert "\n" not in str(caught.value)
    rebuilt = ImageFolderData.from_record(str(root), record, image_size=16)
    assert rebuilt.splits() == data.splits()
    rebuilt.load_state_dict(data.state_dict())  # what Lightning does on a resume
    with pytest.raises(UserError, match=r"the train split"):
        ImageFolderData(str(root), image_size=16, seed=4).load_state_dict(data.state_dict())

    Image.new("RGB", (24, 24)).save(root / "training" / "class_0" / "new.png")
    grown = ImageFolderData(str(root), image_size=16, seed=3)
    hashes = {name: s["sha256"] for name, s in record["splits"].items()}
    new_hashes = {name: s["sha256"] for name, s in grown.split_record()["splits"].items()}
    assert any(hashes[name] != new_hashes[name] for name in hashes)
    with pytest.raises(UserError, match=r"split of .* is not the one of the training run"):
        ImageFolderData.from_record(str(root), record, image_size=16)


def test_kfold_holds_out_every_image_once_stratified_and_seeded(tmp_path):
    root = make_folder(tmp_path / "d", per_class=7)
    runs = [ImageFolderData(str(root), image_size=16, folds=3, fold=k) for k in range(3)]
    held = [run.test_split.paths for run in runs]
    assert sorted(p for paths in held for p in paths) == sorted((root / "training").rglob("*.png"))
    for run in runs:
        assert not run.test_is_val
        counts = Counter(run.test_split.labels)
        assert set(counts) == {0, 1, 2} and set(counts.values()) <= {2, 3}  # 7 = 3 + 2 + 2
        splits = [set(s.paths) for s in run.splits().values()]
        assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
        assert len(set.union(*splits)) == 21
        assert set(run.val_split.labels) == set(run.train_split.labels) == {0, 1, 2}
    again = ImageFolderData(str(root), image_size=16, folds=3, fold=0)
    other = ImageFolderData(str(root), image_size=16, folds=3, fold=0, seed=5)
    assert again.splits() == runs[0].splits() and other.test_split.paths != held[0]


def test_kfold_with_validation_folder_holds_out_val(image_root):
    runs = [ImageFolderData(str(image_root), image_size=16, folds=4, fold=k) for k in range(4)]
    val = [p for run in runs for p in run.val_split.paths]
    assert sorted(val) == sorted((image_root / "training").rglob("*.png"))
    for run in runs:
        assert len(run.val_split.paths) == 6 and len(run.train_split.paths) == 18
        assert set(run.test_split.paths) == set((image_root / "validation").rglob("*.png"))


def test_kfold_split_sizes_differ_by_one_at_most():
    split = Split([Path(str(i)) for i in range(50)], [i % 4 for i in range(50)])
    sizes = [len(kfold_split(split, CLASSES[:4], 6, k, None, seed=0)["val"]) for k in range(6)]
    assert sum(sizes) == 50 and max(sizes) - min(sizes) <= 1


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
    paths = [p for split in data.splits().values() for p in split.paths]
    assert len(paths) == 10
    assert not any(p.suffix == ".txt" for p in paths)


PALETTE = [0, 0, 0, 255, 255, 255, 7, 7, 7, 10, 200, 30]  # index 3: a green no other mode gives


@pytest.mark.parametrize(
    ("mode", "colour", "fmt", "rgb"),
    [
        ("L", 128, "PNG", [128, 128, 128]),
        ("P", 3, "PNG", [10, 200, 30]),  # the palette's colour, not the index
        ("RGBA", (255, 0, 0, 255), "PNG", [255, 0, 0]),
        ("CMYK", (0, 255, 255, 0), "JPEG", [255, 0, 0]),  # no cyan, no key: red
        ("I;16", 65535, "PNG", [255, 255, 255]),
    ],
)
def test_any_mode_decodes_to_rgb_uint8_at_the_requested_size(tmp_path, mode, colour, fmt, rgb):
    path = tmp_path / f"image.{fmt.lower()}"
    image = Image.new(mode, (20, 10), colour)
    if mode == "P":
        image.putpalette(PALETTE)
    image.save(path, format=fmt)
    decoded = decode(path, 12)
    assert decoded.shape == (3, 12, 12) and decoded.dtype == torch.uint8
    expected = torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1).expand(3, 12, 12)
    assert torch.equal(decoded, expected)  # every pixel


def test_resize_is_a_square_squash_without_crop(tmp_path):
    """A 40x10 image with a strip of its own colour along each edge: squashed to 20x20, every
    edge of the result is that strip's colour along its whole length (a crop, a pad or a
    resize that keeps the aspect ratio loses at least one)."""
    path = tmp_path / "wide.png"
    image = Image.new("RGB", (40, 10), (128, 128, 128))
    image.paste((255, 0, 0), (0, 0, 4, 10))  # left
    image.paste((0, 255, 0), (36, 0, 40, 10))  # right
    image.paste((0, 0, 255), (4, 0, 36, 2))  # top, between the side strips
    image.paste((255, 255, 0), (4, 8, 36, 10))  # bottom
    image.save(path)
    decoded = decode(path, 20).int()
    colour = {name: torch.tensor(rgb).view(3, 1) for name, rgb in
              {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
               "yellow": (255, 255, 0)}.items()}  # fmt: skip
    assert decoded.shape == (3, 20, 20)
    edges = {"red": decoded[:, :, 0], "green": decoded[:, :, -1],
             "blue": decoded[:, 0, 3:-3], "yellow": decoded[:, -1, 3:-3]}  # fmt: skip
    for name, edge in edges.items():
        assert (edge - colour[name]).abs().max() <= 8, name
