"""Image folders in the published layout as a LightningDataModule.

The folder is listed and every image checked once at start (src.images: in parallel, with a scan
cache that later runs reuse), training/ is split into train/val/test (or K folds) by class and
seed, and the images are decoded once into memory when they fit, else decoded per item in
DataLoader workers.
Both modes give bit-identical batches: augmentation draws from a seed of (seed, epoch, image).
"""

import hashlib
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler

from src.errors import UserError
from src.images import (
    IMAGE_EXTENSIONS,
    class_folders,
    decode,
    decode_all,
    drop_bad_images,
    ignored,
    list_folder,
    listing,
    scan_cache_file,
    usable_cores,
    worker_start,
)

log = logging.getLogger(__name__)
SAMPLERS = ("shuffle", "balanced")
LAYOUT = "training/<class>/<images> (optionally validation/<class>/<images>)"
MEMORY_SHARE = 0.5  # data.memory_limit_gb=null: this share of the available memory
SPLIT_KEYS = ("seed", "val_fraction", "test_fraction", "folds", "fold")


@dataclass
class Split:
    """Image files and their class indices."""

    paths: list[Path]
    labels: list[int]


class EpochIndex(NamedTuple):
    """What the training sampler yields: an image's index and the epoch it is drawn in, so that
    its augmentation depends on them alone (also in DataLoader workers that outlive an epoch)."""

    epoch: int
    index: int


def missing_classes(folder: Path, classes: list[str], split: Split) -> list[str]:
    """The class folders of `folder` of which `split` holds no image."""
    present = set(split.labels)
    return [str(folder / c) for label, c in enumerate(classes) if label not in present]


def check_classes(training: Path, classes: list[str], split: Split, problem: str) -> None:
    """A UserError naming the class folders of which `split` holds no image."""
    if empty := missing_classes(training, classes, split):
        raise UserError(
            f"{problem} in the class folder(s) {', '.join(empty)}. Fix: add images "
            f"({' '.join(sorted(IMAGE_EXTENSIONS))}) or remove the folder(s)"
        )


def read_folder(
    root: Path, on_bad_image: str = "fail", scan_cache: str | Path | None = None
) -> tuple[list[str], Split, Split | None]:
    """The classes, training images and validation images (None without validation/) of `root`.

    Checks the layout and scans every image first (the class folders are listed and the images
    checked in parallel; `scan_cache` keeps the checks of unchanged files for the next run): each
    problem raises a UserError naming it and the fix; unreadable images are named
    (`on_bad_image="fail"`) or left out with a warning (`"skip"`); other files are left out with a
    warning, hidden files and junk silently.
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
    folders = [top / c for top in tops for c in classes if (top / c).is_dir()]
    with ThreadPoolExecutor(usable_cores()) as pool:
        listed = dict(zip(folders, pool.map(list_folder, folders), strict=True))
    unused = [p for top in tops for p in top.iterdir() if not p.is_dir() and not ignored(p)]
    unused += [p for _, others in listed.values() for p in others]
    if unused:
        log.warning(
            "ignoring %d file(s) that are not images in a class folder (%s): %s",
            len(unused),
            " ".join(sorted(IMAGE_EXTENSIONS)),
            listing(unused, root),
        )

    def read_split(top: Path, bad: set[Path]) -> Split:
        split = Split([], [])
        for label, name in enumerate(classes):
            images = listed[top / name][0] if top / name in listed else []
            paths = [p for p, _, _ in images if p not in bad]
            split.paths += paths
            split.labels += [label] * len(paths)
        return split

    check_classes(training, classes, read_split(training, set()), "no images")
    files = [file for images, _ in listed.values() for file in images]
    cache = scan_cache_file(scan_cache, root) if scan_cache else None
    bad = drop_bad_images(root, files, on_bad_image, cache)
    train = read_split(training, bad)
    check_classes(training, classes, train, "only unreadable images")
    test = read_split(validation, bad) if has_validation else None
    if test is not None and not test.paths:
        raise UserError(
            f"no images in {validation}. Fix: add images to validation/<class>/, or remove "
            "validation/ (the test set is then split from training/)"
        )
    if test is not None and (lacking := missing_classes(validation, classes, test)):
        raise UserError(
            f"no images in {', '.join(lacking)}: the test set (validation/) needs every class. "
            "Fix: add images there, or remove validation/ (the test set is then split from "
            "training/)"
        )
    return classes, train, test


def shuffled_classes(split: Split, seed: int) -> list[tuple[int, list[int]]]:
    """Per class (in label order), the indices of its images in `split` in a seeded random order.

    One pass over the images plus one permutation per class: O(images).
    """
    groups: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(split.labels):
        groups[label].append(i)
    generator = torch.Generator().manual_seed(seed)
    shuffled = []
    for label in sorted(groups):
        order = torch.randperm(len(groups[label]), generator=generator).tolist()
        shuffled.append((label, [groups[label][p] for p in order]))
    return shuffled


def held_out(count: int, fraction: float) -> int:
    """How many of a class's `count` images a split of `fraction` takes: rounded, at least one
    (none for fraction 0), so that rounding never leaves a split without the class."""
    return max(1, round(count * fraction)) if fraction else 0


def too_few(
    classes: list[str], short: list[tuple[int, int]], splitting: str, fix: str
) -> UserError:
    """The one-line error naming the classes (with their image counts) too small for a split."""
    named = ", ".join(f"{classes[label]} ({count} image(s))" for label, count in short)
    return UserError(
        f"{splitting} leaves the class(es) {named} without an image in some split: every class "
        f"needs at least one in each. Fix: add images to them, or {fix}"
    )


def holdout_split(
    split: Split, classes: list[str], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[int]]:
    """Seeded stratified train/val/test indices into `split` (no test part for fraction 0).

    Each class's images are shuffled; val takes the first `held_out(n, val_fraction)`, test the
    next `held_out(n, test_fraction)`, train the rest. With test_fraction 0 this is exactly the
    published 90/10 split of the same seed (the same images, in the same order).
    """
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    short = []
    for label, order in shuffled_classes(split, seed):
        n_val, n_test = held_out(len(order), val_fraction), held_out(len(order), test_fraction)
        if len(order) - n_val - n_test < 1:
            short.append((label, len(order)))
        parts["val"] += order[:n_val]
        parts["test"] += order[n_val : n_val + n_test]
        parts["train"] += order[n_val + n_test :]
    if short:
        names = "train/val/test" if test_fraction else "train/val"
        raise too_few(
            classes,
            short,
            f"splitting training/ into {names} (data.val_fraction={val_fraction}"
            + (f", data.test_fraction={test_fraction})" if test_fraction else ")"),
            "other fractions (data.val_fraction, data.test_fraction; data.test_fraction=0 makes "
            "the test set the val split)",
        )
    return parts


def kfold_split(
    split: Split,
    classes: list[str],
    folds: int,
    fold: int,
    val_fraction: float | None,
    seed: int,
) -> dict[str, list[int]]:
    """Indices into `split` of stratified, seeded K-fold cross-validation.

    Each class's images are shuffled and dealt to the folds in turn (continuing across classes, so
    folds differ in size by one at most); the folds depend on the seed alone, so the K runs of a
    seed hold out each image exactly once. With `val_fraction`, fold `fold` is the test part and
    val is carved (stratified) from the other folds; without, fold `fold` is the val part.
    """
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    held = "test" if val_fraction is not None else "val"
    short, dealt = [], 0
    for label, order in shuffled_classes(split, seed):
        rest = []
        for position, index in enumerate(order):
            (parts[held] if (dealt + position) % folds == fold else rest).append(index)
        dealt += len(order)
        n_val = held_out(len(rest), val_fraction) if val_fraction is not None else 0
        if len(order) < folds or len(rest) - n_val < 1:
            short.append((label, len(order)))
        parts["val"] += rest[:n_val]
        parts["train"] += rest[n_val:]
    if short:
        raise too_few(
            classes,
            short,
            f"data.folds={folds}"
            + (f" with data.val_fraction={val_fraction}" if val_fraction is not None else ""),
            "fewer data.folds" + (", or a lower data.val_fraction" if val_fraction else ""),
        )
    return parts


def split_hash(split: Split, root: Path, classes: list[str]) -> str:
    """sha256 of a split's sorted (path relative to root, class) list: the same on any machine."""
    lines = sorted(
        f"{p.relative_to(root).as_posix()}\t{classes[y]}"
        for p, y in zip(split.paths, split.labels, strict=True)
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def split_settings(record: dict[str, Any]) -> dict[str, Any]:
    """The data module arguments that made the split of `record` (seed, fractions, folds, fold),
    e.g. `instantiate(cfg.data, **split_settings(record))`."""
    try:
        return {key: record[key] for key in SPLIT_KEYS}
    except (KeyError, TypeError) as err:
        raise UserError(
            f"not a split record (no {err}): it comes from ImageFolderData.split_record(). "
            "Fix: a checkpoint of a training run that stored it"
        ) from err


def checkpoint_split(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The split record in a loaded checkpoint of src.train (None in one from before records):
    Lightning keeps the data module's `state_dict()` under its class name."""
    state = checkpoint.get("ImageFolderData")
    return state.get("split") if isinstance(state, dict) else None


def memory_available() -> int:
    """Bytes this process can still use: MemAvailable, or less under a cgroup v2 memory limit
    (a container's, SLURM's), whose usage counts the reclaimable file cache too."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
        available = int(meminfo.split("MemAvailable:")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):  # not Linux
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines())
            used = int((cgroup / "memory.current").read_text()) - int(stat["inactive_file"])
            available = min(available, int(limit) - used)
    except (OSError, ValueError, KeyError):  # no cgroup v2 here
        pass
    return max(available, 0)


def memory_limit(limit_gb: float | None) -> tuple[float, str]:
    """The bytes decoded images may take in memory, and where the figure comes from."""
    if limit_gb is not None:
        return limit_gb * 2**30, f"data.memory_limit_gb={limit_gb}"
    available = memory_available()
    return MEMORY_SHARE * available, (
        f"data.memory_limit_gb=null: {MEMORY_SHARE:.0%} of the {available / 2**30:.1f} GiB "
        "available"
    )


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

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index in self.rows:
            yield (
                self.features[index].to(self.device, non_blocking=True),
                self.labels[index].to(self.device, non_blocking=True),
            )


def minibatches(batch: Any) -> Iterator[Any]:
    """The minibatches of a DataLoader batch: a FeatureChunks' own, else the batch itself."""
    if isinstance(batch, FeatureChunks):
        yield from batch
    else:
        yield batch


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


class StreamingDataset(LabelledDataset):
    """Image files decoded on access (in DataLoader workers), for folders larger than memory."""

    def __init__(
        self,
        paths: list[Path],
        labels: torch.Tensor,
        size: int,
        transform: Callable | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(labels, transform, seed)
        self.paths, self.size = paths, size

    def item(self, index: int) -> torch.Tensor:
        return decode(self.paths[index], self.size)


def shown(value: Any) -> str:
    """A value as it would be written on the command line."""
    return (
        "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    )


def check_settings(
    val_fraction: float,
    test_fraction: float,
    folds: int | None,
    fold: int,
    num_workers: int | str,
    in_memory: bool | str,
    memory_limit_gb: float | None,
) -> None:
    """A one-line UserError for a data setting of the wrong type or range (the same wording as
    src.checks, for a data module built without the command line)."""

    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    def whole(v: Any, low: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    folds_ok = folds is None or whole(folds, 2)
    last_fold = folds - 1 if folds_ok and folds is not None else 0
    rules: list[tuple[str, Any, bool, str, str]] = [
        ("val_fraction", val_fraction, number(val_fraction) and 0 < val_fraction < 1,
         "a number between 0 and 1", "0.1"),
        ("test_fraction", test_fraction, number(test_fraction) and 0 <= test_fraction < 1,
         "a number from 0 (the test set is then the val split) to below 1", "0.1"),
        ("folds", folds, folds_ok, "null or a whole number, at least 2", "5"),
        ("fold", fold, whole(fold, 0) and fold <= last_fold,
         f"a whole number from 0 to {last_fold} (data.folds={shown(folds)})", "0"),
        ("num_workers", num_workers, num_workers == "auto" or whole(num_workers, 0),
         "auto or a whole number, at least 0", "auto"),
        ("in_memory", in_memory, in_memory in ("auto", True, False),
         "auto, true or false", "auto"),
        ("memory_limit_gb", memory_limit_gb,
         memory_limit_gb is None or (number(memory_limit_gb) and memory_limit_gb > 0),
         "null or a number above 0", "8"),
    ]  # fmt: skip
    for key, value, valid, what, example in rules:
        if not valid:
            raise UserError(
                f"data.{key}={shown(value)} is invalid: it must be {what}. "
                f"Fix: e.g. data.{key}={example}"
            )
    if folds is None and val_fraction + test_fraction >= 1:
        raise UserError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} leave no "
            "training images. Fix: fractions that add up to less than 1, e.g. 0.1 and 0.1"
        )


class ImageFolderData(L.LightningDataModule):
    """`<root>/training/<class>/*` split into train/val/test, or train/val with test =
    `<root>/validation/`; or one fold of a K-fold cross-validation (`folds`, `fold`).

    Decoded images take 3 x image_size^2 bytes each (75 KiB at 160 px: 10,000 take 0.7 GiB).
    `in_memory="auto"` keeps them in memory when they fit `memory_limit_gb` (null: half of the
    available memory) and training runs in one process, else streams them from disk: decoded per
    item in `num_workers` DataLoader workers (auto: the usable cores, per device).
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
    ) -> None:
        super().__init__()
        if sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {sampler!r}. Fix: sampler={'|'.join(SAMPLERS)}")
        self.sampler = sampler
        check_settings(
            val_fraction, test_fraction, folds, fold, num_workers, in_memory, memory_limit_gb
        )
        self.root = Path(root)
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.train_transform, self.seed, self.pin_memory = train_transform, seed, pin_memory
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.folds, self.fold = folds, fold
        self.classes, training, validation = read_folder(self.root, on_bad_image, scan_cache)
        carve_val = val_fraction if validation is None else None
        if folds is not None:
            parts = kfold_split(training, self.classes, folds, fold, carve_val, seed)
        else:
            test = test_fraction if validation is None else 0
            parts = holdout_split(training, self.classes, val_fraction, test, seed)
        everything = Split(
            training.paths + (validation.paths if validation else []),
            training.labels + (validation.labels if validation else []),
        )
        if validation is not None:
            parts["test"] = list(range(len(training.paths), len(everything.paths)))
        self.test_is_val = not parts["test"]
        if self.test_is_val:
            parts["test"] = parts["val"]
            log.warning(
                "data.test_fraction=0 and no %s: the test set is the validation split, so the "
                "test accuracy is of the images that chose the checkpoint (optimistic). Fix: "
                "data.test_fraction=0.1, or a validation/ folder",
                self.root / "validation",
            )
        self._all, self._indices = everything, parts
        self.train_split, self.val_split, self.test_split = (
            Split([everything.paths[i] for i in ids], [everything.labels[i] for i in ids])
            for ids in (parts["train"], parts["val"], parts["test"])
        )
        if self.test_is_val:
            self.test_split = self.val_split
        self.in_memory = in_memory
        self.streaming = not self.fits_in_memory(memory_limit_gb)
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
                    split.paths, labels, self.image_size, transform, self.seed
                )
            else:
                images = decode_all(split.paths, self.image_size)
                dataset = ImagesDataset(images, labels, transform, self.seed)
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

    def _make_split_record(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "folds": self.folds,
            "fold": self.fold,
            "test_is_val": self.test_is_val,
            "splits": {
                name: {"count": len(s.paths), "sha256": split_hash(s, self.root, self.classes)}
                for name, s in self.splits().items()
            },
        }

    def check_split(self, record: dict[str, Any]) -> None:
        """A one-line UserError when this module's split differs from `record`'s."""
        settings = " ".join(f"data.{k}={shown(v)}" for k, v in split_settings(record).items())
        then = record.get("splits")
        if not isinstance(then, dict):
            raise UserError(
                "not a split record (no splits): it comes from ImageFolderData.split_record(). "
                "Fix: a checkpoint of a training run that stored it"
            )
        for name, now in self.split_record()["splits"].items():
            if then.get(name) != now:
                count = then[name].get("count") if isinstance(then.get(name), dict) else None
                raise UserError(
                    f"the {name} split of {self.root} ({now['count']} images) is not the one of "
                    f"the training run ({shown(count)} images). Fix: the training run's settings "
                    f"{settings}, and data.root=<the folder it was trained on, unchanged>"
                )

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
