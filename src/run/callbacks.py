"""The trainer's Lightning callbacks and checkpoint IO: an epoch timer, and checkpoints that
survive faults (atomic writes, a last one on Ctrl-C, resuming into any run dir)."""

import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

import src
from src.run.checkpoints import read_weights_only, upgrade

log = logging.getLogger(__name__)
BEST_STATE = (
    "best_model_path",
    "best_model_score",
    "best_k_models",
    "kth_best_model_path",
    "kth_value",
)


def interpreter_age() -> float:
    """Seconds since this interpreter imported the package (src.STARTED): since the command
    started, whatever ran before in the same process (an exec'ing shell's commands)."""
    return time.monotonic() - src.STARTED


class EpochTimer(L.Callback):
    """Logs each training epoch's wall time as `time/epoch_s` and keeps the list; notes when
    the first training batch starts, in seconds since the command started (`first_batch_s`),
    and the whole training loop's wall time, checkpoint writes included (`fit_s`)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.first_batch_s: float | None = None
        self.fit_s: float | None = None
        self._start = self._fit_start = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fit_s = time.perf_counter() - self._fit_start

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, batch_idx: int
    ) -> None:
        if self.first_batch_s is None:
            self.first_batch_s = interpreter_age()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        pl_module.log("time/epoch_s", self.seconds[-1], sync_dist=True)
        so_far = self.figures() | {"fit_s": time.perf_counter() - self._fit_start}
        for name in ("fit_s", "first_epoch_s", "mean_epoch_s"):  # for ddp_spawn (see `figures`)
            pl_module.log(f"time/{name}", so_far[name], sync_dist=True, logger=False)

    def figures(self, trainer: L.Trainer | None = None) -> dict[str, float | None]:
        """The timings a run's result.json reports. ddp_spawn's main process, whose copy of this
        callback saw no epoch, reads those the ranks logged (their mean) at the last epoch's end
        into `trainer`'s metrics (fit_s: until then, without the last checkpoint write), all but
        first_batch_s: a spawned rank's clock starts with the rank, not with the command."""
        own = {
            "first_batch_s": self.first_batch_s,
            "fit_s": self.fit_s,
            "first_epoch_s": self.seconds[0] if self.seconds else None,
            "mean_epoch_s": sum(self.seconds) / len(self.seconds) if self.seconds else None,
        }
        if self.seconds or trainer is None:
            return own
        logged = trainer.callback_metrics
        return {k: float(logged[f"time/{k}"]) if f"time/{k}" in logged else None for k in own}


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


def hard_link(target: str | Path, link: str | Path) -> bool:
    """Make `link` a hard link to `target`, atomically replacing what `link` was; False where
    the filesystem has no hard links (the caller then writes a copy)."""
    link = Path(link)
    partial = link.with_name(f".{link.name}.{os.getpid()}.link")
    try:
        partial.unlink(missing_ok=True)
        os.link(target, partial)
        os.replace(partial, link)
    except OSError:
        partial.unlink(missing_ok=True)
        return False
    return True


def training_ends_now(trainer: L.Trainer) -> bool:
    """Whether the epoch or step now ending is the run's last: max_epochs or max_steps reached,
    or a callback (early stopping, max_time) stopping it."""
    epochs, steps = trainer.max_epochs, trainer.max_steps
    return (
        trainer.should_stop
        or (epochs is not None and epochs >= 0 and trainer.current_epoch + 1 >= epochs)
        or (steps >= 0 and trainer.global_step >= steps)
    )


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose `last.ckpt` is the latest state at most `last_every_s` seconds old
    (every validation when its epochs take longer), at the end of training and on Ctrl-C (or
    SIGTERM); and that keeps the best score of a run resumed into a new run dir.

    Lightning 2.6 writes `last.ckpt` only at the steps where it saves a new best, so a killed run
    would lose every epoch since its last improvement. Writing it after every epoch instead costs
    more than the epoch itself when a head trains on cached features (a 9 MB MobileNetV2
    checkpoint took 40 ms to write and sync on a 2-core Zen 3, a cached epoch 30 ms), hence the
    interval. Lightning also forgets the best score when the checkpoint comes from another dir,
    so a resumed run would take its first epoch as the best; here the old best (its file stays in
    the old dir, which Lightning never deletes from) remains the one to beat, as in an
    uninterrupted run. At a step that wrote a new best, `last.ckpt` becomes a hard link to it
    (one process): the same state, written once.
    """

    def __init__(self, *args: Any, last_every_s: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_every_s = last_every_s
        self._last_written = time.monotonic()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_written = time.monotonic()

    def _save_last_checkpoint(
        self, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]
    ) -> None:
        """Link `last.ckpt` to a best written at this step, else write it when it is due."""
        best = self._last_checkpoint_saved
        best_written_now = (
            best
            and best == self.best_model_path
            and self._last_global_step_saved == trainer.global_step
        )
        if self.save_last is True and best_written_now and trainer.world_size == 1:
            last = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
            if hard_link(best, last):
                self.last_model_path = last
                self._last_written = time.monotonic()
                return
        due = time.monotonic() - self._last_written >= self.last_every_s
        # rank 0's clock decides: every rank must enter the save (a collective) or none
        if trainer.strategy.broadcast(due) or training_ends_now(trainer):
            self._write_last(trainer, monitor_candidates)

    def _write_last(self, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_written = time.monotonic()

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
            self._write_last(trainer, self._monitor_candidates(trainer))
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
