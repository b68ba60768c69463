"""Augmentation of in-memory training batches on the training device.

In memory, the loader runs in the main process (no workers: the images are decoded already), so
per-image augmentation on the CPU would feed a GPU a few hundred to two thousand images a second.
With it deferred, the loader hands over un-augmented uint8 images and each image's seed; the
batch is moved to the device as one pinned copy and augmented there, each image with the same
seeded parameters as the per-image path (src.data.datasets.augment_batch).
"""

from typing import Any

from src.data.datasets import augment_batch

AUGMENT_ON = ("auto", "cpu", "device")


class DeviceAugmentation:
    """Batch hooks of a LightningDataModule whose training items may come with their seeds
    (LabelledDataset.defer): augmented after the transfer to the device."""

    train_transform: Any
    augment_on: str
    streaming: bool
    trainer: Any

    def augments_on_device(self) -> bool:
        """Whether training batches are augmented on the device: `augment_on=device`, or `auto`
        on a CUDA device; only in memory (streamed images are augmented in the workers)."""
        if self.train_transform is None or self.streaming or self.augment_on == "cpu":
            return False
        if self.augment_on == "device":
            return True
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Seeds leave the batch as Python ints: they stay on the host, needing no sync."""
        if isinstance(batch, list | tuple) and len(batch) == 3:
            images, labels, seeds = batch
            return images, labels, seeds.tolist()
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, list | tuple) and len(batch) == 3:
            images, labels, seeds = batch
            return augment_batch(self.train_transform, images, seeds), labels
        return batch
