"""Learning-rate schedules that need the run's length, built when the optimizer is.

The `scheduler` config group holds a `_partial_` `build`; TransferModel.configure_optimizers
calls it with the optimizer, plus `total_steps` (the run's optimizer steps) for the ones stepped
every batch (`interval: step`). Each keeps the ratio between param groups (head and backbone).
"""

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR


def warmup_cosine(
    optimizer: Optimizer,
    total_steps: int,
    warmup_epochs: float,
    max_epochs: int,
    min_factor: float = 0.0,
) -> LambdaLR:
    """Linear warm-up over `warmup_epochs`, then cosine decay to `min_factor` x the lr.

    A LambdaLR: its factor is a function of the step alone, so a resumed run continues exactly.
    """
    warmup = round(total_steps * warmup_epochs / max_epochs) if max_epochs > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def one_cycle(optimizer: Optimizer, total_steps: int, **kwargs: object) -> OneCycleLR:
    """OneCycleLR peaking at each param group's own lr (head and backbone keep their ratio)."""
    max_lr = [group["lr"] for group in optimizer.param_groups]
    return OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps, **kwargs)
