"""Labelled image datasets, in memory or streamed from disk, with per-item seeded augmentation:
both give the same items."""

from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset

from src.data.images import decode
from src.data.sampling import EpochIndex, item_seed


class LabelledDataset(Dataset):
    """Items with labels and an optional per-image transform (augmentation) seeded per item.

    Accepts an index or an EpochIndex; the transform runs under `torch.random.fork_rng` seeded by
    `item_seed(seed, epoch, index)`, so it is the same in memory or streamed, in any worker, in
    any run with the same seed, and leaves the global generator alone.
    """

    def __init__(self, labels: torch.Tensor, transform: Callable | None, seed: int) -> None:
        self.labels, self.transform, self.seed = labels, transform, seed

    def __len__(self) -> int:
        return len(self.labels)

    def item(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, key: int | EpochIndex) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image = self.item(index)
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed(self.seed, epoch, index))
                image = self.transform(image)
        return image, self.labels[index]


class ImagesDataset(LabelledDataset):
    """In-memory rows with labels: decoded uint8 images (or features, see FeaturesDataset)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(labels, transform, seed)
        self.images = images

    def item(self, index: int) -> torch.Tensor:
        return self.images[index]


class StreamingDataset(LabelledDataset):
    """Image files decoded on access (in DataLoader workers), for folders larger than memory."""

    def __init__(
        self,
        paths: list[Path],
        labels: torch.Tensor,
        size: int,
        transform: Callable | None = None,
        seed: int = 0,
        resize: str = "squash",
    ) -> None:
        super().__init__(labels, transform, seed)
        self.paths, self.size, self.resize = paths, size, resize

    def item(self, index: int) -> torch.Tensor:
        return decode(self.paths[index], self.size, self.resize)
