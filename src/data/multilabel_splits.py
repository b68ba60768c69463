"""Seeded splits of a multi-label set that keep each label's share in every part: iterative
stratification (Sechidis et al. 2011, the `iterative-stratification` package) for train/val/test
and K folds; a label too rare to reach every part is named in one warning."""

import logging

import numpy as np
import torch
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold, MultilabelStratifiedShuffleSplit

from src.run.errors import UserError

log = logging.getLogger(__name__)


def carve(
    targets: torch.Tensor, pool: list[int], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """`pool` (indices into `targets`) split into (rest, held out) with `fraction` held out,
    stratified by label and seeded; both in increasing order."""
    if not fraction:
        return sorted(pool), []
    held = max(1, round(len(pool) * fraction))
    if held >= len(pool):
        raise UserError(
            f"a split of {fraction} of {len(pool)} images leaves none to train on. "
            "Fix: more images, or smaller data.val_fraction / data.test_fraction"
        )
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=held, random_state=seed)
    y = targets[pool].numpy()
    rest, out = next(splitter.split(np.zeros((len(pool), 1)), y))
    return sorted(pool[i] for i in rest), sorted(pool[i] for i in out)


def holdout_split(
    targets: torch.Tensor, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[int]]:
    """Train/val/test indices: test carved from all images, then val from the rest."""
    pool, test = carve(targets, list(range(len(targets))), test_fraction, seed)
    train, val = carve(targets, pool, val_fraction / (1 - test_fraction), seed)
    return {"train": train, "val": val, "test": test}


def kfold_split(
    targets: torch.Tensor, folds: int, fold: int, val_fraction: float, seed: int
) -> dict[str, list[int]]:
    """Fold `fold` of `folds` stratified folds as the test part; val carved from the others."""
    if folds > len(targets):
        raise UserError(f"data.folds={folds} exceeds the {len(targets)} images. Fix: fewer folds")
    splitter = MultilabelStratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    splits = list(splitter.split(np.zeros((len(targets), 1)), targets.numpy()))
    rest, test = splits[fold]
    train, val = carve(targets, rest.tolist(), val_fraction, seed)
    return {"train": train, "val": val, "test": sorted(test.tolist())}


def given_split(splits: list[str]) -> dict[str, list[int]]:
    """The parts a table's split column names, in row order."""
    return {
        name: [i for i, s in enumerate(splits) if s == name] for name in ("train", "val", "test")
    }


def warn_missing(
    targets: torch.Tensor, parts: dict[str, list[int]], classes: list[str]
) -> list[str]:
    """One warning naming each label with no image in some non-empty part (and its count of
    images); returns those labels."""
    missing = []
    for label, name in enumerate(classes):
        empty = [p for p, ids in parts.items() if ids and targets[ids, label].sum() == 0]
        if empty:
            missing.append(
                f"{name} ({int(targets[:, label].sum())} image(s), none in {'/'.join(empty)})"
            )
    if missing:
        log.warning(
            "label(s) not in every split: %s. Their val/test figures are undefined (AP of no "
            "positive). Fix: more images with them",
            ", ".join(missing),
        )
    return missing
