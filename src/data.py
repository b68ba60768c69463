"""Image folders in the published layout, decoded once into memory, as a LightningDataModule."""

import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset
from torchvision.transforms.v2.functional import pil_to_tensor

from src.errors import UserError

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
JUNK_FILES = {"thumbs.db", "desktop.ini"}  # and every hidden file (.DS_Store, macOS's ._x.jpg)
MAX_LISTED = 20  # bad images named in one message
MIN_SIDE = 8  # images smaller than this (px) are used, with a warning
LAYOUT = "training/<class>/<images> (optionally validation/<class>/<images>)"


@dataclass
class Split:
    """Image files and their class indices."""

    paths: list[Path]
    labels: list[int]


def ignored(path: Path) -> bool:
    """Hidden files and the junk that file managers leave (.DS_Store, Thumbs.db, desktop.ini)."""
    return path.name.startswith(".") or path.name.lower() in JUNK_FILES


def is_image(path: Path) -> bool:
    """An image file by its extension, in any letter case."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file() and not ignored(path)


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted."""
    return sorted(p for p in folder.iterdir() if is_image(p))


def not_images(folder: Path) -> list[Path]:
    """What `folder` holds besides images, hidden files and junk (to warn about)."""
    return sorted(p for p in folder.iterdir() if not ignored(p) and not is_image(p))


def class_folders(root: Path) -> list[str]:
    """Class names: the sub-folders of `root`, sorted."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not ignored(p))


def read_split(root: Path, classes: list[str]) -> Split:
    """Every image of `root/<class>/`, labelled by its class's index in `classes`."""
    split = Split([], [])
    for label, name in enumerate(classes):
        folder = root / name
        paths = list_images(folder) if folder.is_dir() else []
        split.paths += paths
        split.labels += [label] * len(paths)
    return split


def stratified_split(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Seeded split keeping `fraction` of each class (rounded) for the second part."""
    generator = torch.Generator().manual_seed(seed)
    first, second = Split([], []), Split([], [])
    for label in sorted(set(split.labels)):
        indices = [i for i, y in enumerate(split.labels) if y == label]
        order = torch.randperm(len(indices), generator=generator).tolist()
        n_second = round(len(indices) * fraction)
        for rank, position in enumerate(order):
            part = second if rank < n_second else first
            part.paths.append(split.paths[indices[position]])
            part.labels.append(label)
    return first, second


def check_image(path: Path) -> tuple[int, int]:
    """The (width, height) of the image in `path`; raises if it cannot be decoded.

    Fast: reading the header rejects non-images and decompression bombs (PIL's
    DecompressionBombError), PNG checksums are verified without decompressing, JPEG is decoded
    at 1/8 scale and the other formats fully, which finds truncated files.
    """
    with Image.open(path) as image:
        size = image.size
        if image.format == "PNG":
            image.verify()
        else:
            image.draft(None, (1, 1))  # JPEG decodes at 1/8 scale, other formats ignore it
            image.load()
    return size


def image_problem(path: Path) -> str | tuple[int, int]:
    """Why `path` cannot be used as an image, or its (width, height) when it can."""
    try:
        return check_image(path)
    except UnidentifiedImageError:
        return "empty file" if path.stat().st_size == 0 else "not an image"
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        return str(err) or type(err).__name__


def scan_images(paths: list[Path]) -> tuple[dict[Path, str], list[Path]]:
    """The unreadable images (path -> why) and the tiny ones, checked in parallel threads."""
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        results = dict(zip(paths, pool.map(image_problem, paths), strict=True))
    bad = {p: r for p, r in results.items() if isinstance(r, str)}
    tiny = [p for p, r in results.items() if isinstance(r, tuple) and min(r) < MIN_SIDE]
    return bad, tiny


def listing(paths: list[Path], root: Path, notes: dict[Path, str] | None = None) -> str:
    """At most MAX_LISTED paths relative to `root` (with their notes), then a count of the rest."""
    names = [
        f"{p.relative_to(root)}" + (f" ({notes[p]})" if notes else "") for p in paths[:MAX_LISTED]
    ]
    more = f" and {len(paths) - MAX_LISTED} more" if len(paths) > MAX_LISTED else ""
    return ", ".join(names) + more


def decode(path: Path, size: int) -> torch.Tensor:
    """An image file as a (3, size, size) uint8 RGB tensor, EXIF-rotated and resized (no crop).

    An animated image gives its first frame.
    """
    try:
        with Image.open(path) as image:
            image.draft("RGB", (size, size))  # JPEG: decode at the smallest DCT scale >= size
            image = ImageOps.exif_transpose(image)
            if image.mode in {"I;16", "I;16B", "I;16L", "I"}:  # 16-bit grayscale: scale to 8 bits
                image = image.point(lambda v: v / 256).convert("L")
            rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    except Exception as err:  # what the scan at start missed; PIL raises many types
        raise UserError(f"cannot decode {path}: {err}. Fix: replace or delete the file") from err
    return pil_to_tensor(rgb)


def decode_all(paths: list[Path], size: int) -> torch.Tensor:
    """Decode every image once, in parallel threads, into one (N, 3, size, size) uint8 tensor."""
    images = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for i, image in enumerate(pool.map(lambda p: decode(p, size), paths)):
            images[i] = image
    return images


def drop_bad_images(
    root: Path, train: Split, test: Split | None, on_bad_image: str
) -> tuple[Split, Split | None]:
    """The splits without unreadable images (`on_bad_image="skip"`), or a UserError naming them."""
    paths = train.paths + (test.paths if test else [])
    bad, tiny = scan_images(paths)
    if tiny:
        log.warning(
            "%d image(s) smaller than %d px on a side (used, upscaled): %s",
            len(tiny),
            MIN_SIDE,
            listing(tiny, root),
        )
    if not bad:
        return train, test
    found = f"{len(bad)} unreadable image(s) in {root}: {listing(list(bad), root, bad)}"
    if on_bad_image != "skip":
        raise UserError(
            f"{found}. Fix: replace or delete them, or data.on_bad_image=skip to train on the rest"
        )
    log.warning("skipping %s (data.on_bad_image=skip)", found)

    def keep(split: Split) -> Split:
        kept = [(p, y) for p, y in zip(split.paths, split.labels, strict=True) if p not in bad]
        return Split([p for p, _ in kept], [y for _, y in kept])

    return keep(train), keep(test) if test else None


def check_classes(training: Path, classes: list[str], split: Split, problem: str) -> None:
    """A UserError naming the class folders of which `split` holds no image."""
    present = set(split.labels)
    empty = [str(training / c) for label, c in enumerate(classes) if label not in present]
    if empty:
        raise UserError(
            f"{problem} in the class folder(s) {', '.join(empty)}. Fix: add images "
            f"({' '.join(sorted(IMAGE_EXTENSIONS))}) or remove the folder(s)"
        )


def read_folder(root: Path, on_bad_image: str = "fail") -> tuple[list[str], Split, Split | None]:
    """The classes, training images and validation images (None without validation/) of `root`.

    Checks the layout and scans every image first: each problem raises a UserError naming it and
    the fix; unreadable images are named (`on_bad_image="fail"`) or left out with a warning
    (`"skip"`); other files are left out with a warning, hidden files and junk silently.
    """
    training, validation = root / "training", root / "validation"
    if not root.is_dir():
        where = "" if root.is_absolute() else f" (from {Path.cwd()})"
        raise UserError(
            f"data.root={root} is not a folder{where}. Fix: data.root=<a folder holding {LAYOUT}>"
        )
    if not training.is_dir():
        raise UserError(
            f"no training folder {training}. Fix: point data.root at a folder holding {LAYOUT}"
        )
    classes = class_folders(training)
    if len(classes) < 2:
        raise UserError(
            f"{training} has {len(classes)} class folder(s) {classes}, training needs at least 2. "
            f"Fix: put each class's images in its own folder {training}/<class>/"
        )
    has_validation = validation.is_dir()
    extra = sorted(set(class_folders(validation)) - set(classes)) if has_validation else []
    if extra:
        raise UserError(
            f"{validation} has classes that {training} lacks: {', '.join(extra)}. "
            "Fix: add training images for them, or remove them from validation/"
        )
    tops = [training, validation] if has_validation else [training]
    class_dirs = [top / c for top in tops for c in class_folders(top)]
    unused = [p for top in tops for p in top.iterdir() if not p.is_dir() and not ignored(p)]
    unused += [p for folder in class_dirs for p in not_images(folder)]
    if unused:
        log.warning(
            "ignoring %d file(s) that are not images in a class folder (%s): %s",
            len(unused),
            " ".join(sorted(IMAGE_EXTENSIONS)),
            listing(unused, root),
        )
    train = read_split(training, classes)
    check_classes(training, classes, train, "no images")
    test = read_split(validation, classes) if has_validation else None
    train, test = drop_bad_images(root, train, test, on_bad_image)
    check_classes(training, classes, train, "only unreadable images")
    if test is not None and not test.paths:
        raise UserError(
            f"no images in {validation}. Fix: add images to validation/<class>/, or remove "
            "validation/ (the test set is then the validation split)"
        )
    return classes, train, test


class EpochShuffle(Sampler[int]):
    """A random order per epoch drawn from the seed and the epoch number alone.

    Lightning calls `set_epoch` before each epoch, so a run resumed from a checkpoint shuffles
    exactly as an uninterrupted one (a DataLoader's own generator restarts from its seed).
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        seed = int(np.random.SeedSequence((self.seed, self.epoch)).generate_state(1)[0])
        return iter(
            torch.randperm(self.size, generator=torch.Generator().manual_seed(seed)).tolist()
        )


class ImagesDataset(Dataset):
    """In-memory uint8 images with labels and an optional per-image transform (augmentation)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        return (self.transform(image) if self.transform else image), self.labels[index]


class ImageFolderData(L.LightningDataModule):
    """`<root>/training/<class>/*` split into train/val; test = `<root>/validation/` if present.

    Images are decoded and resized once per run and kept in memory as uint8
    (3 x image_size^2 bytes each: 75 KiB at 160 px, so 10,000 images take 0.7 GiB).
    """

    def __init__(
        self,
        root: str,
        image_size: int = 160,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        train_transform=None,
        on_bad_image: str = "fail",
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.train_transform, self.seed = train_transform, seed
        self.classes, training, test = read_folder(self.root, on_bad_image)
        self.train_split, self.val_split = stratified_split(training, val_fraction, seed)
        if not self.train_split.paths or not self.val_split.paths:
            raise UserError(
                f"data.val_fraction={val_fraction} splits the {len(training.paths)} training "
                f"images into {len(self.train_split.paths)} for training and "
                f"{len(self.val_split.paths)} for validation; both need some. "
                "Fix: add images, or change data.val_fraction"
            )
        self.test_is_val = test is None
        self.test_split = self.val_split if test is None else test
        self.datasets: dict[str, Dataset] = {}

    def setup(self, stage: str | None = None) -> None:
        """Decode each split's images once (later calls reuse them)."""
        if self.datasets:
            return
        if self.test_is_val:
            log.warning("no %s: the test set is the validation split", self.root / "validation")
        for name, split in self.splits().items():
            images = decode_all(split.paths, self.image_size)
            transform = self.train_transform if name == "train" else None
            self.datasets[name] = ImagesDataset(images, torch.tensor(split.labels), transform)

    def splits(self) -> dict[str, Split]:
        """The file lists of the train, val and test splits."""
        return {"train": self.train_split, "val": self.val_split, "test": self.test_split}

    def use_features(self, features: dict[str, torch.Tensor]) -> None:
        """Serve precomputed backbone features instead of images (a frozen backbone's cache)."""
        for name, split in self.splits().items():
            self.datasets[name] = TensorDataset(features[name], torch.tensor(split.labels))

    def _loader(self, name: str, sampler: Sampler | None = None) -> DataLoader:
        dataset = self.datasets[name]
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            # a last training batch of one image would break BatchNorm in a training backbone
            drop_last=sampler is not None and len(dataset) % self.batch_size == 1,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", EpochShuffle(len(self.datasets["train"]), self.seed))

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
