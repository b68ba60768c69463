"""Training order drawn from the seed and the epoch alone, so a resumed run draws like an
uninterrupted one; class balance."""

import logging
from collections.abc import Iterator
from typing import NamedTuple

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from src.data.folder import Split

log = logging.getLogger(__name__)

SAMPLERS = ("shuffle", "balanced")


class EpochIndex(NamedTuple):
    """What the training sampler yields: an image's index and the epoch it is drawn in, so that
    its augmentation depends on them alone (also in DataLoader workers that outlive an epoch)."""

    epoch: int
    index: int


def world_size(trainer: L.Trainer | None) -> int:
    """The number of processes training together: the Trainer's, else torch.distributed's."""
    if trainer is not None:
        return trainer.world_size
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one image's augmentation in one epoch: a function of these three alone."""
    return int(np.random.SeedSequence((seed, epoch, index)).generate_state(1, np.uint64)[0])


class EpochShuffle(Sampler[EpochIndex]):
    """A random order per epoch drawn from the seed and the epoch number alone.

    Lightning calls `set_epoch` before each epoch (also through its DistributedSampler wrapper),
    so a run resumed from a checkpoint shuffles exactly as an uninterrupted one (a DataLoader's
    own generator restarts from its seed). Each index comes with its epoch, for the augmentation.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[EpochIndex]:
        seed = int(np.random.SeedSequence((self.seed, self.epoch)).generate_state(1)[0])
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(seed))
        return (EpochIndex(self.epoch, i) for i in order.tolist())


class EpochBalanced(EpochShuffle):
    """Draws (with replacement) as many images per epoch as the split has, each class equally
    often on average, from the seed and the epoch alone, so it resumes exactly like EpochShuffle.
    """

    def __init__(self, labels: list[int], seed: int) -> None:
        super().__init__(len(labels), seed)
        counts = torch.bincount(torch.tensor(labels)).double()
        self.weights = (1 / counts)[torch.tensor(labels)]

    def __iter__(self) -> Iterator[EpochIndex]:
        seed = int(np.random.SeedSequence((self.seed, self.epoch)).generate_state(1)[0])
        generator = torch.Generator().manual_seed(seed)
        drawn = torch.multinomial(self.weights, self.size, replacement=True, generator=generator)
        return (EpochIndex(self.epoch, i) for i in drawn.tolist())


def class_counts(split: Split, classes: list[str]) -> list[int]:
    """Images per class of `split`."""
    return torch.bincount(torch.tensor(split.labels), minlength=len(classes)).tolist()


def warn_if_imbalanced(split: Split, classes: list[str], ratio: float = 3.0) -> None:
    """One warning when the largest class has `ratio` times the images of the smallest or more."""
    counts = class_counts(split, classes)
    large, small = (
        max(range(len(counts)), key=counts.__getitem__),
        min(range(len(counts)), key=counts.__getitem__),
    )
    if counts[large] >= ratio * counts[small]:
        log.warning(
            "unbalanced classes: %s has %d training images, %s %d. Consider class_weights=auto "
            "(inverse class frequency in the loss) or sampler=balanced (each class drawn equally "
            "often)",
            classes[large],
            counts[large],
            classes[small],
            counts[small],
        )
