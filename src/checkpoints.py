"""Checkpoints that survive faults and run no code: atomic writes, a last one on Ctrl-C,
resuming anywhere, and every read through `read_checkpoint` (torch's weights-only unpickler)."""

import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from src.errors import UserError

log = logging.getLogger(__name__)
CKPT_FIX = "Fix: give a .ckpt file written by src.train"
RECORD = "lightning_transfer"  # the checkpoint's own entry: format version, settings, split
VERSION = 2
REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+)")  # in torch's message: the first global refused
BEST_STATE = (
    "best_model_path",
    "best_model_score",
    "best_k_models",
    "kth_best_model_path",
    "kth_value",
)


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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a hidden file beside it, then renames it over the target; reads
    each with `read_checkpoint`.

    A crash, a SIGKILL or a full disk mid-write leaves the previous checkpoint whole. (Lightning's
    own write goes through the system temp dir, which is a copy, not a rename, when that is
    another filesystem.) A write that fails removes its partial file. Every load Lightning makes
    (`fit(ckpt_path=...)`, `test(ckpt_path="best")`, lr_find's restore) goes through
    `load_checkpoint`, so none of them runs code from a file; tensors come to the CPU and
    Lightning copies them to the device of the model and optimizer they are loaded into.
    """

    def load_checkpoint(
        self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Weights only, even where a caller asks for a full unpickle. Besides checkpoints,
        Lightning reads the model state that ddp_spawn's rank 0 hands to the main process."""
        checkpoint = read_weights_only(path)
        return upgrade(checkpoint) if isinstance(checkpoint, dict) else checkpoint

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose `last.ckpt` is always the latest state: written after every
    validation and on Ctrl-C (or SIGTERM) during training; and that keeps the best score of a
    run resumed into a new run dir.

    Lightning 2.6 writes `last.ckpt` only at the steps where it saves a new best, so a killed run
    would lose every epoch since its last improvement. And it forgets the best score when the
    checkpoint comes from another dir, so a resumed run would take its first epoch as the best;
    here the old best (its file stays in the old dir, which Lightning never deletes from) remains
    the one to beat, as in an uninterrupted run.
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self.save_last_if_missed(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self.save_last_if_missed(trainer)

    def save_last_if_missed(self, trainer: L.Trainer) -> None:
        """Write `last.ckpt` unless this step was saved already (or saving is off)."""
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        super().on_exception(trainer, pl_module, exception)
        interrupted = isinstance(exception, KeyboardInterrupt | SIGTERMException)
        if not interrupted or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        if self._last_global_step_saved != trainer.global_step:  # else last.ckpt is current
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if self.last_model_path:
            log.warning(
                "interrupted; resume with ckpt_path=%s", Path(self.last_model_path).resolve()
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        moved = state_dict.get("dirpath", self.dirpath) != self.dirpath
        best = state_dict.get("best_model_path")
        if not moved or not best or not Path(best).is_file():
            super().load_state_dict(state_dict)
            return
        for key in BEST_STATE:
            setattr(self, key, state_dict[key])
