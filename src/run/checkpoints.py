"""The checkpoint contract: what a run records (`run_settings`), how a checkpoint is read without
running code (`read_checkpoint`, torch's weights-only unpickler), upgraded from older layouts, and
checked before a run resumes from it (`check_resume`). Writing is src.run.callbacks'; the split
record is checked by src.data.module.ImageFolderData.check_split."""

import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from src.run.config import shown
from src.run.errors import UserError

log = logging.getLogger(__name__)

CKPT_FIX = "Fix: give a .ckpt file written by src.train"
CKPT_PATH_FIX = (  # for a command's ckpt_path argument
    "Fix: ckpt_path=outputs/<date>/<time>/checkpoints/best.ckpt (a training run's checkpoint)"
)
RECORD = "lightning_transfer"  # the checkpoint's own entry: format version, settings, split
VERSION = 2
REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+)")  # in torch's message: the first global refused


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint at `path` on the CPU (`read_weights_only`), with its model's state."""
    checkpoint = read_weights_only(path, mmap)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(
            f"{path} is not a checkpoint of src.train (it holds no 'state_dict'). {CKPT_FIX}"
        )
    return checkpoint


def read_weights_only(path: str | Path, mmap: bool = False) -> Any:
    """What torch.save wrote to `path`, on the CPU, read without running anything it holds.

    `weights_only=True` (explicit, so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot turn it off)
    rebuilds only tensors, containers and primitive values. That is all this trainer's
    checkpoints hold, whatever the fine-tune, scheduler, early stopping, lr_find, precision or
    a Ctrl-C mid-epoch: their only globals are collections.OrderedDict, torch's tensor rebuild
    and storage types, which torch allows by default, so no extra type is allow-listed. A file
    that would build anything else (a crafted one runs code while it is unpickled) is refused
    before it runs: a UserError naming the file and what it holds; so is a truncated or foreign
    file. `mmap` maps the tensors instead of reading them.
    """
    if not zipfile.is_zipfile(path):  # what torch.save writes; nothing else is unpickled
        why = "not a zip archive as torch.save writes: truncated, empty or another format"
        raise UserError(
            f"{path} is not a checkpoint of src.train "
            f"({why if Path(path).is_file() else 'no such file'}). {CKPT_FIX}"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:  # the weights-only unpickler refused something
        found = REFUSED_GLOBAL.search(str(err))
        what = found[1] if found else "pickle instructions torch's weights-only loader refuses"
        raise UserError(
            f"{path} holds objects this trainer's checkpoints never contain ({what}); it was "
            f"refused and nothing in it was run. {CKPT_FIX}"
        ) from err
    except Exception as err:  # torch.load raises many types for a broken or foreign file
        first = (str(err).strip().splitlines() or [""])[0]
        raise UserError(
            f"{path} is not a checkpoint of src.train ({type(err).__name__}: {first}). {CKPT_FIX}"
        ) from err
    return checkpoint


def upgrade(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of version 1 (before backbones kept their own pooling) in today's layout.

    Version 1 held torchvision's `.features` as `backbone.*` and named timm's TF EfficientNet-
    Lite0 `efficientnet_lite0`, which in timm is another architecture.
    """
    if RECORD in ckpt or "hyper_parameters" not in ckpt:
        return ckpt
    hparams = dict(ckpt["hyper_parameters"])
    backbone = dict(hparams["backbone"])
    state = ckpt["state_dict"]
    old_layout = not any(k.startswith("backbone.features.") for k in state)
    if backbone.get("_target_", "").endswith("torchvision_backbone") and old_layout:
        state = {re.sub(r"^backbone\.", "backbone.features.", k): v for k, v in state.items()}
    elif backbone["name"] == "efficientnet_lite0":
        backbone["name"] = "tf_efficientnet_lite0"
    return {**ckpt, "hyper_parameters": hparams | {"backbone": backbone}, "state_dict": state}


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
    settings["data.resize"] = cfg.data.get("resize", "squash")
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
    resize = {"data.resize": hparams.get("resize", "squash")}  # none recorded: squash, as before
    return {"classes": list(hparams["classes"]), **resize, **settings}


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
