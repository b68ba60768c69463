"""Image folders in the published layout, decoded once into memory, as a LightningDataModule."""

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.transforms.v2.functional import pil_to_tensor

from src.errors import UserError

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass
class Split:
    """Image files and their class indices."""

    paths: list[Path]
    labels: list[int]


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, by extension in any letter case, sorted."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def class_folders(root: Path) -> list[str]:
    """Class names: the sub-folders of `root`, sorted."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


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


def decode(path: Path, size: int) -> torch.Tensor:
    """An image file as a (3, size, size) uint8 RGB tensor, EXIF-rotated and resized (no crop)."""
    with Image.open(path) as image:
        image.draft("RGB", (size, size))  # JPEG: decode at the smallest DCT scale >= size
        image = ImageOps.exif_transpose(image)
        if image.mode in {"I;16", "I;16B", "I;16L", "I"}:  # 16-bit grayscale: scale to 8 bits
            image = image.point(lambda v: v / 256).convert("L")
        rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return pil_to_tensor(rgb)


def decode_all(paths: list[Path], size: int) -> torch.Tensor:
    """Decode every image once, in parallel threads, into one (N, 3, size, size) uint8 tensor."""
    images = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for i, image in enumerate(pool.map(lambda p: decode(p, size), paths)):
            images[i] = image
    return images


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
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.train_transform = train_transform
        training = self.root / "training"
        if not training.is_dir():
            raise UserError(
                f"no training folder {training}. Fix: point data.root at a folder holding "
                "training/<class>/<images> (optionally validation/<class>/<images>)"
            )
        self.classes = class_folders(training)
        self.train_split, self.val_split = stratified_split(
            read_split(training, self.classes), val_fraction, seed
        )
        validation = self.root / "validation"
        self.test_is_val = not validation.is_dir()
        self.test_split = (
            self.val_split if self.test_is_val else read_split(validation, self.classes)
        )
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

    def _loader(self, name: str, shuffle: bool = False) -> DataLoader:
        dataset = self.datasets[name]
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            # a last training batch of one image would break BatchNorm in a training backbone
            drop_last=shuffle and len(dataset) % self.batch_size == 1,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
