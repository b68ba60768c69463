"""Checkpoints that survive faults: atomic writes, a last one on Ctrl-C, resuming anywhere."""

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)
BEST_STATE = (
    "best_model_path",
    "best_model_score",
    "best_k_models",
    "kth_best_model_path",
    "kth_value",
)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a hidden file beside it, then renames it over the target.

    A crash, a SIGKILL or a full disk mid-write leaves the previous checkpoint whole. (Lightning's
    own write goes through the system temp dir, which is a copy, not a rename, when that is
    another filesystem.) A write that fails removes its partial file.
    """

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
