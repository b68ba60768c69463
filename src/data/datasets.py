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

    Accepts an index or an EpochIndex; the transform runs `seeded` by `item_seed(seed, epoch,
    index)`, so it is the same in memory or streamed, in any worker, in any run with the same
    seed. `defer`: items come un-augmented with their seed, for `augment_batch` on the device.
    """

    def __init__(self, labels: torch.Tensor, transform: Callable | None, seed: int) -> None:
        self.labels, self.transform, self.seed = labels, transform, seed
        self.defer = False

    def __len__(self) -> int:
        return len(self.labels)

    def item(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, key: int | EpochIndex) -> tuple[torch.Tensor, ...]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image = self.item(index)
        if self.transform is None:
            return image, self.labels[index]
        seed = item_seed(self.seed, epoch, index)
        if self.defer:
            return image, self.labels[index], torch.tensor(seed, dtype=torch.uint64)
        return seeded(self.transform, image, seed), self.labels[index]


def seeded(transform: Callable, image: torch.Tensor, seed: int) -> torch.Tensor:
    """`transform(image)` with its random draws from the CPU generator seeded by `seed`, then
    restored: the CUDA generators are neither reseeded nor forked (torch.manual_seed would
    reseed them all), and a CUDA image draws the same parameters as a CPU one."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return transform(image)


def augment_batch(transform: Callable, images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """Each image of a batch (on any device) through `transform`, seeded as the per-image path
    seeds it: the same crop, flip and colour parameters. On the CPU the pixels are the per-image
    path's exactly; on a GPU they differ by the kernels' rounding (interpolation, colour)."""
    return torch.stack([seeded(transform, x, s) for x, s in zip(images, seeds, strict=True)])


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
