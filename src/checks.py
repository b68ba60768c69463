"""Checks before any long work: each mistake in the config or the machine is one UserError."""

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from src.errors import UserError

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
    "data.num_workers": (whole(0), "a whole number, at least 0", "0"),
    "cache_features": (lambda v: v in ("auto", True, False), "auto, true or false", "auto"),
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


def check_resume(ckpt_path: str | None, backbone: str, classes: list[str], freeze: bool) -> None:
    """A UserError unless `ckpt_path` (if any) is a readable checkpoint of the same backbone,
    classes and freeze setting as this run."""
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
        hparams = torch.load(path, map_location="cpu", weights_only=False, mmap=True)[
            "hyper_parameters"
        ]
        trained = {
            "backbone": hparams["backbone"]["name"],
            "classes": list(hparams["classes"]),
            "freeze": bool(hparams["freeze"]),
        }
    except Exception as err:  # torch.load raises many types for a broken or foreign file
        raise UserError(
            f"ckpt_path={ckpt_path} is not a checkpoint of this trainer ({type(err).__name__}: "
            f"{err}). Fix: give a .ckpt file written by src.train, {fresh}"
        ) from err
    now = {"backbone": backbone, "classes": classes, "freeze": freeze}
    fixes = {
        "backbone": f"backbone={trained['backbone']}",
        "classes": "data.root=<the folder it was trained on>",
        "freeze": f"freeze={shown(trained['freeze'])}",
    }
    for key, fix in fixes.items():
        if trained[key] != now[key]:
            raise UserError(
                f"ckpt_path={ckpt_path} was trained with {key} {shown(trained[key])}, this run "
                f"has {key} {shown(now[key])}. Fix: {fix}, {fresh}"
            )
