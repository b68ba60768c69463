"""Reading checkpoints without running code: every read goes through `read_checkpoint` (torch's
weights-only unpickler), and older layouts are upgraded. Writing them is src.callbacks'."""

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from src.run.errors import UserError

CKPT_FIX = "Fix: give a .ckpt file written by src.train"
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
