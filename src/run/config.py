"""Checks before any long work: each mistake in the config or the machine is one UserError."""

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from src.run.checkpoints import CKPT_FIX, RECORD, read_checkpoint, upgrade
from src.run.errors import UserError
from src.run.runtime import MEMORY_FORMATS

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
    "data.on_bad_image": (lambda v: v in ("fail", "skip"), "fail or skip", "skip"),
    "data.num_workers": (
        lambda v: v == "auto" or whole(0)(v),
        "auto or a whole number, at least 0",
        "auto",
    ),
    "cache_features": (lambda v: v in ("auto", True, False), "auto, true or false", "auto"),
    "head_fit": (lambda v: v in ("probe", "recipe"), "probe or recipe", "probe"),
    "probe.select": (lambda v: v in ("loss", "acc"), "loss or acc", "loss"),
    "probe.refit": (lambda v: v in ("trainval", "train"), "trainval or train", "trainval"),
    "class_weights": (lambda v: v in (None, "auto"), "auto or null", "auto"),
    "sampler": (lambda v: v in ("shuffle", "balanced"), "shuffle or balanced", "balanced"),
    "memory_format": (
        lambda v: v == "auto" or v in MEMORY_FORMATS,
        f"auto, {' or '.join(MEMORY_FORMATS)}",
        "auto",
    ),
    "last_ckpt_every_s": (lambda v: number(v) and v >= 0, "a number of seconds, at least 0", "10"),
    "folds": (lambda v: v is None or whole(2)(v), "null or a whole number, at least 2", "5"),
}


def shown(value: Any) -> str:
    """A value as it would be written on the command line."""
    return (
        "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    )


def check_config(cfg: DictConfig) -> None:
    """Values of the wrong type or range, a missing data.root, a GPU trainer without a GPU, an
    output dir that cannot be written: each raises a UserError naming the key and the fix."""
    data = cfg.get("data")
    if isinstance(data, DictConfig) and OmegaConf.is_missing(data, "root"):
        raise UserError(
            "data.root is not set. Fix: data.root=/path/to/folder (holding training/<class>/"
            "<images>), or data=footwear for the embedded images"
        )
    for key, (valid, what, example) in RULES.items():
        value = OmegaConf.select(cfg, key, default=ABSENT)
        if value is not ABSENT and not valid(value):
            raise UserError(
                f"{key}={shown(value)} is invalid: it must be {what}. Fix: e.g. {key}={example}"
            )
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


def run_settings(cfg: DictConfig) -> dict[str, Any]:
    """The settings a resumed run must share with its checkpoint, by command-line key.

    The backbone; the fine-tune strategy with all its fields; `freeze` where it decides
    (finetune=none: the others ignore it); the scheduler; and `trainer.max_epochs` for the
    schedulers stepped every batch (cosine, onecycle), which are built for the run's total steps:
    a resumed OneCycleLR keeps the checkpoint's total and raises once a longer run steps past
    it, and the cosine would jump to another curve. Checkpoints carry them, as
    `checkpoint["lightning_transfer"]["settings"]` (version 2), for `check_resume` to compare.
    """
    settings = model_settings(
        cfg.backbone.name, OmegaConf.to_container(cfg.finetune, resolve=True), cfg.freeze
    )
    settings["scheduler"] = cfg.scheduler.name
    if cfg.scheduler.get("interval") == "step":
        settings["trainer.max_epochs"] = cfg.trainer.max_epochs
    return settings


def model_settings(backbone: str, finetune: dict[str, Any], freeze: bool) -> dict[str, Any]:
    """The part of `run_settings` that a TransferModel's hyperparameters hold too (so checkpoints
    written before the settings were recorded can be checked that far)."""
    fields = {f"finetune.{key}": value for key, value in finetune.items() if key != "name"}
    settings = {"backbone": backbone, "finetune": finetune["name"], **fields}
    if finetune["name"] == "none":
        settings["freeze"] = bool(freeze)
    return settings


def trained_settings(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The classes and settings a checkpoint was trained with: its recorded `run_settings`, else
    (older checkpoints) those its hyperparameters hold."""
    hparams = checkpoint["hyper_parameters"]
    record = checkpoint.get(RECORD)
    if record is None:
        finetune = hparams.get("finetune") or {"name": "none"}  # none before fine-tuning existed
        settings = model_settings(hparams["backbone"]["name"], finetune, hparams["freeze"])
    else:
        settings = record["settings"]
    return {"classes": list(hparams["classes"]), **settings}


def check_resume(ckpt_path: str | None, cfg: DictConfig, classes: list[str]) -> None:
    """A UserError unless `ckpt_path` (if any) is a checkpoint that `read_checkpoint` accepts,
    trained on `classes` with this run's `run_settings`. A checkpoint written before the settings
    were recorded is checked on what its hyperparameters hold, with a warning for the rest."""
    if ckpt_path is None:
        return
    path = Path(ckpt_path)
    fresh = "or ckpt_path=null to start afresh"
    if not path.is_file():
        raise UserError(
            f"ckpt_path={ckpt_path}: no such file. Fix: the path of a checkpoint such as "
            f"outputs/<date>/<time>/checkpoints/last.ckpt, {fresh}"
        )
    try:
        checkpoint = read_checkpoint(path, mmap=True)
    except UserError as err:  # "<path> ... Fix: ..." -> "ckpt_path=<path> ... Fix: ..., <fresh>"
        raise UserError(f"ckpt_path={err}, {fresh}") from err
    try:
        trained = trained_settings(upgrade(checkpoint))
    except (KeyError, TypeError, AttributeError) as err:
        raise UserError(
            f"ckpt_path={ckpt_path} is not a checkpoint of src.train ({type(err).__name__}: "
            f"{err}). {CKPT_FIX}, {fresh}"
        ) from err
    now = {"classes": classes, **run_settings(cfg)}
    for key, value in now.items():
        if key in trained and trained[key] != value:
            fix = f"{key}={shown(trained[key])}"
            why = ""
            if key == "classes":
                fix = "data.root=<the folder it was trained on>"
            elif key == "trainer.max_epochs":
                why = f" (scheduler={now['scheduler']} is built for the run's length)"
            raise UserError(
                f"ckpt_path={ckpt_path} was trained with {key} {shown(trained[key])}, this run "
                f"has {key} {shown(value)}{why}. Fix: {fix}, {fresh}"
            )
    if unchecked := [key for key in now if key not in trained]:
        log.warning(
            "ckpt_path=%s predates the resume check of %s: it resumes with this run's %s, "
            "which must be what it was trained with (see its run dir's .hydra/config.yaml), %s",
            ckpt_path,
            ", ".join(unchecked),
            " ".join(f"{key}={shown(now[key])}" for key in unchecked),
            fresh,
        )
