"""Image folders as a LightningDataModule: listed and checked once (src.data.folder), split by
class and seed (src.data.splits), decoded once into memory when they fit, else streamed.
Both modes give bit-identical batches: augmentation draws from a seed of (seed, epoch, image)."""

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler

from src.data.datasets import ImagesDataset, StreamingDataset
from src.data.device_augment import AUGMENT_ON, DeviceAugmentation
from src.data.exclude import drop_excluded
from src.data.folder import Split
from src.data.images import check_resize, decode_all, usable_cores, worker_start
from src.data.layouts import describe, read_source
from src.data.memory import memory_limit
from src.data.sampling import SAMPLERS, EpochBalanced, EpochShuffle, world_size
from src.data.splits import (
    check_settings,
    compare_split,
    layout_record,
    layout_split,
    split_hash,
    split_settings,
)
from src.frozen.batches import EpochBatches, FeaturesDataset
from src.run.errors import UserError

log = logging.getLogger(__name__)


class ImageFolderData(DeviceAugmentation, L.LightningDataModule):
    """`<root>/training/<class>/*` split into train/val/test, or train/val with test =
    `<root>/validation/`; or one fold of a K-fold cross-validation (`folds`, `fold`).

    Decoded images take 3 x image_size^2 bytes each (75 KiB at 160 px: 10,000 take 0.7 GiB).
    `in_memory="auto"` keeps them in memory when they fit `memory_limit_gb` (null: half of the
    available memory) and training runs in one process, else streams them from disk: decoded per
    item in `num_workers` DataLoader workers (auto: the usable cores, per device). `augment_on`:
    where in-memory training images are augmented (src.data.device_augment; auto: on a GPU).
    """

    def __init__(
        self,
        root: str,
        image_size: int = 160,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int | str = "auto",
        train_transform: Callable | None = None,
        on_bad_image: str = "fail",
        *,
        test_fraction: float = 0.1,
        folds: int | None = None,
        fold: int = 0,
        in_memory: bool | str = "auto",
        memory_limit_gb: float | None = None,
        scan_cache: str | None = None,
        pin_memory: bool | None = None,
        sampler: str = "shuffle",
        layout: str = "auto",
        path_column: str | None = None,
        label_column: str | None = None,
        resize: str = "squash",
        exclude: str | None = None,
        augment_on: str = "auto",
    ) -> None:
        super().__init__()
        self._keep_settings(
            root, image_size, batch_size, val_fraction, seed, num_workers, train_transform,
            test_fraction, folds, fold, in_memory, memory_limit_gb, pin_memory, sampler, resize,
            augment_on,
        )  # fmt: skip
        source = read_source(self.root, layout, on_bad_image, scan_cache, path_column, label_column)
        self.classes, self.layout, self.base = source.classes, source.layout, source.base
        self.table_sha256, self.test_given = source.table_sha256, "test" in source.given
        everything, parts, carved = layout_split(
            source.train,
            source.given,
            self.classes,
            {k: getattr(self, k) for k in ("seed", "val_fraction", "test_fraction")}
            | {"folds": folds, "fold": fold},
        )
        self.pool = source.origin["train"]  # where the splits that the data lacks are carved
        carved = {role: how.format(pool=self.pool) for role, how in carved.items()}
        self.test_source = source.origin.get("test") or carved["test"]
        log.info(describe(source, self.root, carved))
        parts, self.excluded = drop_excluded(parts, everything.paths, exclude, self.root)
        self._use_splits(
            everything,
            parts,
            f"data.test_fraction=0 and no {self.root / 'validation'}: the test set is the "
            "validation split, so the test accuracy is of the images that chose the checkpoint "
            "(optimistic). Fix: data.test_fraction=0.1, or a validation/ folder",
        )

    def _keep_settings(
        self,
        root: str,
        image_size: int,
        batch_size: int,
        val_fraction: float,
        seed: int,
        num_workers: int | str,
        train_transform: Callable | None,
        test_fraction: float,
        folds: int | None,
        fold: int,
        in_memory: bool | str,
        memory_limit_gb: float | None,
        pin_memory: bool | None,
        sampler: str,
        resize: str,
        augment_on: str,
    ) -> None:
        """Check the settings every data module shares (a UserError naming a wrong one) and keep
        them; `memory_limit_gb` is used by `_use_splits`."""
        if sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {sampler!r}. Fix: sampler={'|'.join(SAMPLERS)}")
        if augment_on not in AUGMENT_ON:
            raise UserError(f"unknown augment_on {augment_on!r}. Fix: {'|'.join(AUGMENT_ON)}")
        check_settings(
            val_fraction, test_fraction, folds, fold, num_workers, in_memory, memory_limit_gb
        )
        self.root, self.resize = Path(root), check_resize(resize)
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.train_transform, self.seed, self.pin_memory = train_transform, seed, pin_memory
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.folds, self.fold, self.sampler, self.augment_on = folds, fold, sampler, augment_on
        self.in_memory, self.memory_limit_gb = in_memory, memory_limit_gb

    def _use_splits(self, everything: Split, parts: dict[str, list[int]], no_test: str) -> None:
        """Make the train/val/test splits of `everything` from `parts` (indices per split; an
        empty test becomes the val split, with the warning `no_test`) and choose memory or
        streaming for them."""
        self.test_is_val = not parts["test"]
        if self.test_is_val:
            parts["test"] = parts["val"]
            log.warning(no_test)
        self._all, self._indices = everything, parts
        self.train_split, self.val_split, self.test_split = (
            Split([everything.paths[i] for i in ids], [everything.labels[i] for i in ids])
            for ids in (parts["train"], parts["val"], parts["test"])
        )
        if self.test_is_val:
            self.test_split = self.val_split
        self.streaming = not self.fits_in_memory(self.memory_limit_gb)
        self.datasets: dict[str, Dataset] = {}
        self.whole_epochs = False
        self._split_record: dict[str, Any] | None = None

    @classmethod
    def from_record(cls, root: str, record: dict[str, Any], **kwargs: Any) -> "ImageFolderData":
        """The data module of `root` with the split of `record` (`split_record()` of a training
        run), or a UserError when the folder no longer gives that split."""
        data = cls(root, **kwargs, **split_settings(record))
        data.check_split(record)
        return data

    def fits_in_memory(self, limit_gb: float | None) -> bool:
        """Whether to decode the images into memory (`in_memory`; auto: when they fit the limit)."""
        if self.in_memory != "auto":
            return bool(self.in_memory)
        need = len(self._all.paths) * 3 * self.image_size**2
        limit, source = memory_limit(limit_gb)
        fits = need <= limit
        log.info(
            "%d decoded images at %d px take %.2f GiB, the in-memory limit is %.2f GiB (%s): %s",
            len(self._all.paths),
            self.image_size,
            need / 2**30,
            limit / 2**30,
            source,
            "decoded once into memory" if fits else "streamed: decoded per batch in workers",
        )
        return fits

    @property
    def workers(self) -> int:
        """DataLoader worker processes: `num_workers`, or for auto the usable cores divided among
        this node's devices when streaming, none in memory (the images are decoded already)."""
        if self.num_workers != "auto":
            return int(self.num_workers)
        if not self.streaming:
            return 0
        devices = self.trainer.num_devices if self.trainer is not None else 1
        return max(1, usable_cores() // devices)

    def setup(self, stage: str | None = None) -> None:
        """Build each split's dataset once (later calls reuse them): decoded into memory, or
        streamed. Under DDP the images are streamed, so that each rank reads only its share."""
        if self.datasets:
            return
        if not self.streaming and (ranks := world_size(self.trainer)) > 1:
            (log.warning if self.in_memory is True else log.info)(
                "%d processes train together: streaming the images instead of decoding them all "
                "into memory in each, so that each reads only its share",
                ranks,
            )
            self.streaming = True
        for name, split in self.splits().items():
            if name == "test" and self.test_is_val:
                self.datasets[name] = self.datasets["val"]
                continue
            transform = self.train_transform if name == "train" else None
            labels = torch.tensor(split.labels)
            if self.streaming:
                dataset = StreamingDataset(
                    split.paths, labels, self.image_size, transform, self.seed, self.resize
                )
            else:
                images = decode_all(split.paths, self.image_size, self.resize)
                dataset = ImagesDataset(images, labels, transform, self.seed)
                dataset.defer = transform is not None and self.augments_on_device()
            self.datasets[name] = dataset

    def splits(self) -> dict[str, Split]:
        """The file lists of the train, val and test splits."""
        return {"train": self.train_split, "val": self.val_split, "test": self.test_split}

    def all_images(self) -> list[Path]:
        """Every image of the folder once (training/, then validation/), in a fixed order: what a
        frozen backbone's features are computed of, once for every split and fold."""
        return self._all.paths

    def split_indices(self) -> dict[str, list[int]]:
        """Per split, the positions of its images in `all_images()` (test = val's when
        `test_is_val`): features of all images, indexed by these, give each split's."""
        return {name: list(indices) for name, indices in self._indices.items()}

    def split_record(self) -> dict[str, Any]:
        """The split's settings and, per split, its image count and the sha256 of its sorted
        (relative path, class) list: stored with a checkpoint to find the same split again.
        Computed once: every checkpoint stores it."""
        if self._split_record is None:
            self._split_record = self._make_split_record()
        return self._split_record

    def _split_settings(self) -> dict[str, Any]:
        """The settings that make the split, as every split record holds them."""
        keys = ("seed", "val_fraction", "test_fraction", "folds", "fold", "test_is_val")
        return {key: getattr(self, key) for key in keys}

    def _make_split_record(self) -> dict[str, Any]:
        return (
            self._split_settings()
            | {
                "splits": {
                    name: {"count": len(s.paths), "sha256": split_hash(s, self.base, self.classes)}
                    for name, s in self.splits().items()
                },
            }
            | layout_record(self.layout, self.table_sha256)
            | ({"exclude": self.excluded} if self.excluded else {})
        )

    def check_split(self, record: dict[str, Any]) -> None:
        """A one-line UserError when this module's split differs from `record`'s."""
        compare_split(record, self.split_record(), self.root)

    def state_dict(self) -> dict[str, Any]:
        """What Lightning stores in each checkpoint (under the key "ImageFolderData"): the split
        record, for `checkpoint_split`."""
        return {"split": self.split_record()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning's call on a resume (or a test) from a checkpoint: a UserError unless this
        is the split that the checkpoint was trained on."""
        self.check_split(state_dict["split"])

    def use_features(self, features: dict[str, torch.Tensor], whole_epochs: bool = False) -> None:
        """Serve precomputed backbone features instead of images (a frozen backbone's cache);
        `whole_epochs`: each loader's one batch is a pass's minibatches (FeatureChunks)."""
        for name, split in self.splits().items():
            self.datasets[name] = FeaturesDataset(features[name], torch.tensor(split.labels))
        self.whole_epochs = whole_epochs

    def drops_last(self, images: int) -> bool:
        """Whether training drops a last batch: one of a single image would break BatchNorm in a
        training backbone."""
        return images % self.batch_size == 1

    def train_batches(self) -> int:
        """Minibatches per training epoch."""
        images = len(self.train_split.paths)
        return -(-images // self.batch_size) - self.drops_last(images)

    def _loader(self, name: str, sampler: Sampler | str | None = None) -> DataLoader:
        self.setup()  # a no-op once set up; needed where Lightning set up other processes (DDP)
        dataset = self.datasets[name]
        if sampler == "unrepeated":
            sampler = UnrepeatedDistributedSampler(
                dataset, world_size(self.trainer), self.trainer.global_rank, shuffle=False
            )
        pin = self.pin_memory
        if pin is None:
            pin = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        drop_last = name == "train" and self.drops_last(len(dataset))
        features = isinstance(dataset, FeaturesDataset)
        if features and self.whole_epochs:
            minibatches = BatchSampler(
                sampler or SequentialSampler(dataset), self.batch_size, drop_last
            )
            batching: dict[str, Any] = {"batch_sampler": EpochBatches(minibatches)}
        else:
            batching = {"batch_size": self.batch_size, "sampler": sampler, "drop_last": drop_last}
        workers = 0 if features else self.workers  # features are in memory, indexed per batch
        return DataLoader(
            dataset,
            **batching,
            num_workers=workers,
            persistent_workers=workers > 0,
            multiprocessing_context=worker_start(workers),
            pin_memory=pin,
            prefetch_factor=4 if workers and pin else None,  # a GPU waits on no decoded batch
            **({"collate_fn": FeaturesDataset.collate} if features else {}),
        )

    def train_dataloader(self) -> DataLoader:
        if self.sampler == "balanced":
            return self._loader("train", EpochBalanced(self.train_split.labels, self.seed))
        return self._loader("train", EpochShuffle(len(self.train_split.paths), self.seed))

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        """Under DDP each rank tests its share without the padding of Lightning's default
        sampler, so the reduced metrics count every test image exactly once."""
        if world_size(self.trainer) > 1 and dist.is_available() and dist.is_initialized():
            return self._loader("test", "unrepeated")
        return self._loader("test")
