"""Checks before any long work: each mistake in the config or the machine is one UserError."""

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from src.run.errors import UserError
from src.run.runtime import MEMORY_FORMATS, PRECISIONS

log = logging.getLogger(__name__)
MAX_SEED = 2**32 - 1  # what seed_everything accepts and numpy's SeedSequence needs (>= 0)
ABSENT = object()


def whole(low: int, high: float = float("inf")) -> Callable[[Any], bool]:
    """A test for a whole number in [low, high] (not a bool, which Python counts as an int)."""
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def number(v: Any) -> bool:
    """An int or float, not a bool."""
    return isinstance(v, int | float) and not isinstance(v, bool)


# key -> (test, what it must be, an example value)
RULES: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    "freeze": (lambda v: isinstance(v, bool), "true or false", "true"),
    "seed": (whole(0, MAX_SEED), f"a whole number from 0 to {MAX_SEED}", "42"),
    "image_size": (whole(32), "a whole number of pixels, at least 32", "160"),
    "batch_size": (whole(1), "a whole number, at least 1", "32"),
    "trainer.max_epochs": (whole(1), "a whole number, at least 1", "50"),
    "optimizer.lr": (lambda v: number(v) and v > 0, "a number above 0", "1e-4"),
    "data.val_fraction": (lambda v: number(v) and 0 < v < 1, "a number between 0 and 1", "0.1"),
    "data.test_fraction": (
        lambda v: number(v) and 0 <= v < 1,
        "a number from 0 (the test set is then the val split) to below 1",
        "0.1",
    ),
    "data.folds": (lambda v: v is None or whole(2)(v), "null or a whole number, at least 2", "5"),
    "data.in_memory": (lambda v: v in ("auto", True, False), "auto, true or false", "auto"),
    "data.memory_limit_gb": (
        lambda v: v is None or (number(v) and v > 0),
        "null or a number above 0",
        "8",
    ),
    "data.on_bad_image": (lambda v: v in ("fail", "skip"), "fail or skip", "skip"),
    "data.layout": (
        lambda v: v in ("auto", "published", "splits", "classes", "table"),
        "auto, published, splits, classes or table",
        "auto",
    ),
    "data.resize": (lambda v: v in ("squash", "pad", "crop"), "squash, pad or crop", "pad"),
    "data.num_workers": (
        lambda v: v == "auto" or whole(0)(v),
        "auto or a whole number, at least 0",
        "auto",
    ),
    "cache_features": (lambda v: v in ("auto", True, False), "auto, true or false", "auto"),
    "head_fit": (lambda v: v in ("probe", "recipe"), "probe or recipe", "probe"),
    "probe.select": (lambda v: v in ("loss", "acc", "mAP"), "loss, acc or mAP", "loss"),
    "probe.refit": (lambda v: v in ("trainval", "train"), "trainval or train", "trainval"),
    "class_weights": (lambda v: v in (None, "auto"), "auto or null", "auto"),
    "sampler": (lambda v: v in ("shuffle", "balanced"), "shuffle or balanced", "balanced"),
    "memory_format": (
        lambda v: v == "auto" or v in MEMORY_FORMATS,
        f"auto, {' or '.join(MEMORY_FORMATS)}",
        "auto",
    ),
    "precision": (
        lambda v: v in PRECISIONS,
        " or ".join(PRECISIONS),
        "auto",
    ),
    "compile": (lambda v: v in ("auto", True, False), "auto, true or false", "auto"),
    "trainer.deterministic": (
        lambda v: v in ("auto", True, False, "warn"),
        "auto, true, false or warn",
        "auto",
    ),
    "last_ckpt_every_s": (lambda v: number(v) and v >= 0, "a number of seconds, at least 0", "10"),
    "folds": (lambda v: v is None or whole(2)(v), "null or a whole number, at least 2", "5"),
    "calibrate": (lambda v: isinstance(v, bool), "true or false", "true"),
    "ood": (lambda v: v is False or isinstance(v, DictConfig), "false or its settings", "false"),
    "ood.score": (lambda v: v in ("knn", "msp", "energy"), "knn, msp or energy", "knn"),
    "ood.k": (whole(1), "a whole number, at least 1", "5"),
    "ood.coverage": (lambda v: number(v) and 0 < v <= 1, "a number in (0, 1]", "0.95"),
    "ood.max_features": (
        lambda v: v is None or whole(1)(v),
        "null or a whole number, at least 1",
        "20000",
    ),
    "audit.folds": (whole(2), "a whole number, at least 2", "5"),
    "audit.l2": (lambda v: number(v) and v > 0, "a number above 0", "0.3"),
    "audit.label_neighbours": (whole(1), "a whole number, at least 1", "10"),
    "audit.frac_noise": (lambda v: number(v) and v > 0, "a number above 0", "1.25"),
    "audit.neighbours": (whole(1), "a whole number, at least 1", "5"),
    "audit.outlier_z": (lambda v: number(v) and v > 0, "a number above 0", "5.0"),
    "audit.page_limit": (whole(0), "a whole number, at least 0", "200"),
}


def shown(value: Any) -> str:
    """A value as it would be written on the command line."""
    return (
        "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    )


def check_value(key: str, value: Any) -> None:
    """A UserError naming `key`, what it must be and an example, unless `value` obeys its rule."""
    valid, what, example = RULES[key]
    if not valid(value):
        raise UserError(
            f"{key}={shown(value)} is invalid: it must be {what}. Fix: e.g. {key}={example}"
        )


def check_config(cfg: DictConfig) -> None:
    """Values of the wrong type or range, a missing data.root, a GPU trainer without a GPU, an
    output dir that cannot be written: each raises a UserError naming the key and the fix."""
    data = cfg.get("data")
    if isinstance(data, DictConfig) and OmegaConf.is_missing(data, "root"):
        raise UserError(
            "data.root is not set. Fix: data.root=/path/to/folder (holding training/<class>/"
            "<images>, train/ val/ test/, or a folder per class) or to a labels.csv, or "
            "data=footwear for the embedded images"
        )
    for key in RULES:
        value = OmegaConf.select(cfg, key, default=ABSENT)
        if value is not ABSENT:
            check_value(key, value)
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto"))
    if accelerator in {"gpu", "cuda"} and not torch.cuda.is_available():
        raise UserError(
            f"trainer.accelerator={accelerator} but torch finds no CUDA GPU here. "
            "Fix: trainer=cpu, or trainer=default (uses a GPU when there is one)"
        )
    check_writable(Path(cfg.output_dir))


def check_writable(folder: Path) -> None:
    """A UserError unless a file can be created in `folder` (created if needed)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UserError(
            f"cannot write to the output dir {folder}: {err.strerror}. "
            "Fix: hydra.run.dir=<a folder you can write>"
        ) from err
