"""Seeded, stratified splits of a folder (train/val/test or K folds) and the record that finds
the same split again (stored in every checkpoint)."""

import hashlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from src.data.folder import Split
from src.data.scan import relative
from src.run.config import check_value, shown, whole
from src.run.errors import UserError

SPLIT_KEYS = ("seed", "val_fraction", "test_fraction", "folds", "fold")


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


def layout_split(
    train: Split,
    given: dict[str, Split],
    classes: list[str],
    settings: dict[str, Any],
) -> tuple[Split, dict[str, list[int]], dict[str, str]]:
    """All images (the training pool, then the given val and test splits) and each split's
    indices into them: the splits a layout does not give are carved from the pool by
    `holdout_split` or `kfold_split` (`settings`: SPLIT_KEYS), as in the published layout.
    Also says how each carved split was made, of "{pool}" (for the log line)."""
    seed, val_fraction, test_fraction = (settings[k] for k in SPLIT_KEYS[:3])
    folds, fold = settings["folds"], settings["fold"]
    carved = {}
    if folds is not None:
        if "val" in given:
            raise UserError(
                f"data.folds={folds} carves the val split from the training images, but the data "
                "gives its own val split. Fix: data.folds=null, or no val split in the data"
            )
        carve_val = val_fraction if "test" not in given else None
        parts = kfold_split(train, classes, folds, fold, carve_val, seed)
        held = "test" if carve_val is not None else "val"
        carved[held] = f"fold {fold} of {folds} of {{pool}} (stratified, seed {seed})"
        if carve_val is not None:
            carved["val"] = f"{val_fraction} of the other folds"
    else:
        val = 0 if "val" in given else val_fraction
        test = 0 if "test" in given else test_fraction
        parts = holdout_split(train, classes, val, test, seed)
        carved = {
            "val": f"{val} of {{pool}} (stratified, seed {seed})",
            "test": f"{test} of {{pool}} (stratified, seed {seed})" if test else "val's images",
        }
    everything = Split(list(train.paths), list(train.labels))
    for role in ("val", "test"):
        if role in given:
            start = len(everything.paths)
            everything.paths += given[role].paths
            everything.labels += given[role].labels
            parts[role] = list(range(start, len(everything.paths)))
    return everything, parts, carved


def split_hash(split: Split, root: Path, classes: list[str]) -> str:
    """sha256 of a split's sorted (path relative to root, class) list: the same on any machine."""
    lines = sorted(
        f"{relative(p, root)}\t{classes[y]}" for p, y in zip(split.paths, split.labels, strict=True)
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


def check_settings(
    val_fraction: float,
    test_fraction: float,
    folds: int | None,
    fold: int,
    num_workers: int | str,
    in_memory: bool | str,
    memory_limit_gb: float | None,
) -> None:
    """A one-line UserError for a data setting of the wrong type or range, by the rules of
    src.run.config (for a data module built without the command line)."""
    for key, value in {
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "folds": folds,
        "num_workers": num_workers,
        "in_memory": in_memory,
        "memory_limit_gb": memory_limit_gb,
    }.items():
        check_value(f"data.{key}", value)
    last_fold = folds - 1 if folds is not None else 0
    if not whole(0, last_fold)(fold):
        raise UserError(
            f"data.fold={shown(fold)} is invalid: it must be a whole number from 0 to "
            f"{last_fold} (data.folds={shown(folds)}). Fix: e.g. data.fold=0"
        )
    if folds is None and val_fraction + test_fraction >= 1:
        raise UserError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} leave no "
            "training images. Fix: fractions that add up to less than 1, e.g. 0.1 and 0.1"
        )


def layout_record(layout: str, table_sha256: str | None) -> dict[str, Any]:
    """A split record's entries beyond the published layout's (whose record stays as it was):
    the layout, and a table's bytes hash, so that an edited table is noticed."""
    if layout == "published":
        return {}
    return {"layout": layout} | ({"table_sha256": table_sha256} if table_sha256 else {})


def compare_split(record: dict[str, Any], now: dict[str, Any], root: Path) -> None:
    """A one-line UserError when the split record `now` (of the data at `root`) differs from
    `record` (a training run's)."""
    settings = " ".join(f"data.{k}={shown(v)}" for k, v in split_settings(record).items())
    if record.get("exclude"):
        settings += f" data.exclude={record['exclude'].get('file')}"
    then = record.get("splits")
    if not isinstance(then, dict):
        raise UserError(
            "not a split record (no splits): it comes from ImageFolderData.split_record(). "
            "Fix: a checkpoint of a training run that stored it"
        )
    table = record.get("table_sha256")
    if table and table != now.get("table_sha256"):
        raise UserError(
            f"the table {root} is not the one of the training run (its bytes differ). "
            "Fix: data.root=<the table the run was trained on, unchanged>"
        )
    for name, split in now["splits"].items():
        if then.get(name) != split:
            count = then[name].get("count") if isinstance(then.get(name), dict) else None
            raise UserError(
                f"the {name} split of {root} ({split['count']} images) is not the one of "
                f"the training run ({shown(count)} images). Fix: the training run's settings "
                f"{settings}, and data.root=<the folder it was trained on, unchanged>"
            )


def checkpoint_split(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The split record in a loaded checkpoint of src.train (None in one from before records):
    Lightning keeps the data module's `state_dict()` under its class name."""
    state = checkpoint.get("ImageFolderData")
    return state.get("split") if isinstance(state, dict) else None
