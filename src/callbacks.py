"""Small Lightning callbacks for the trainer."""

import time

import lightning as L


class EpochTimer(L.Callback):
    """Logs each training epoch's wall time as `time/epoch_s` and keeps the list."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        pl_module.log("time/epoch_s", self.seconds[-1], on_step=False, on_epoch=True)
