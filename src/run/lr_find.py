"""Lightning's learning-rate range test (`lr_find=true`): its suggestion, printed and plotted."""

import math
from pathlib import Path

import lightning as L
import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from lightning.pytorch.tuner import Tuner  # noqa: E402


def find_lr(
    trainer: L.Trainer, model: L.LightningModule, data: L.LightningDataModule, out: Path
) -> float:
    """Sweep the lr up exponentially over 100 steps, save `lr_find.png` in `out`, print the pick.

    The sweep runs its 100 steps whatever `trainer.max_epochs` says. Every param group gets the
    swept lr (a fine-tune's backbone scale is not applied), and the model's weights are restored
    afterwards. Returns the suggestion (NaN when the sweep gives none).
    """
    max_epochs = trainer.fit_loop.max_epochs
    trainer.fit_loop.max_epochs = -1  # no epoch limit: the finder counts steps
    try:
        finder = Tuner(trainer).lr_find(model, datamodule=data, update_attr=False)
    finally:
        trainer.fit_loop.max_epochs = max_epochs
    suggestion = finder.suggestion()
    figure = finder.plot(suggest=suggestion is not None)
    figure.savefig(out / "lr_find.png")
    plt.close(figure)
    value = math.nan if suggestion is None else float(suggestion)
    print(f"LR_FIND suggestion={value:.3g} plot={out / 'lr_find.png'}")
    return value
