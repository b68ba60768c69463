"""Batches of cached features: one indexing per batch, and a whole epoch's minibatches in one
Lightning step (FeatureChunks)."""

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, Sampler

from src.data.datasets import ImagesDataset
from src.data.sampling import EpochIndex


class FeaturesDataset(ImagesDataset):
    """Cached features and labels, a batch taken by one indexing of each tensor.

    The DataLoader hands `__getitems__` a batch's keys; the default per-item fetch and collation
    cost more than the head's step on pooled features. The batches are the same as per item.
    Given a list of minibatches' keys (EpochBatches), it returns them as one FeatureChunks.
    """

    def __getitems__(
        self, keys: list[int | EpochIndex] | list[list[int | EpochIndex]]
    ) -> "tuple[torch.Tensor, torch.Tensor] | FeatureChunks":
        if keys and isinstance(keys[0], list):
            return FeatureChunks(self.images, self.labels, [row_index(k) for k in keys])
        index = row_index(keys)
        return self.images[index], self.labels[index]

    @staticmethod
    def collate(batch: Any) -> Any:
        """The batch as `__getitems__` made it."""
        return batch


def row_index(keys: list[int | EpochIndex]) -> torch.Tensor:
    """The dataset rows of a minibatch's sampler keys."""
    return torch.tensor([k[1] if isinstance(k, tuple) else k for k in keys])


class FeatureChunks:
    """A run of minibatches of cached features, handed to the model as one DataLoader batch.

    One Lightning step then trains (or evaluates) through all of them: the loop's per-step cost
    (hooks, logging, the optimizer wrappers: about 1 ms) dwarfs a linear head's step on pooled
    features. Each minibatch is indexed (and moved to `device`) only when reached, so an epoch of
    a large cache is never copied whole. `to()` is what Lightning's batch transfer calls.
    """

    __slots__ = ("features", "labels", "rows", "device")

    def __init__(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        rows: list[torch.Tensor],
        device: torch.device | str = "cpu",
    ) -> None:
        self.features, self.labels, self.rows, self.device = features, labels, rows, device

    def to(self, device: torch.device | str, **kwargs: Any) -> "FeatureChunks":
        return FeatureChunks(self.features, self.labels, self.rows, device)

    def __len__(self) -> int:
        return len(self.rows)

    def minibatches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The run's minibatches in order: what a model steps through for this one batch."""
        return iter(self)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index in self.rows:
            yield (
                self.features[index].to(self.device, non_blocking=True),
                self.labels[index].to(self.device, non_blocking=True),
            )


def minibatches(batch: Any) -> Iterator[Any]:
    """The minibatches of a DataLoader batch: a FeatureChunks' own, else the batch itself."""
    return batch.minibatches() if isinstance(batch, FeatureChunks) else iter([batch])


class EpochBatches(Sampler[list[list[Any]]]):
    """A batch sampler with one batch per pass: all of `batches`' minibatches, as a list.

    `sampler` is exposed so that Lightning's `set_epoch` reaches the epoch's shuffle, as it does
    through a plain BatchSampler.
    """

    def __init__(self, batches: BatchSampler) -> None:
        self.batches, self.sampler = batches, batches.sampler

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[list[list[Any]]]:
        yield list(self.batches)
