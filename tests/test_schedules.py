"""The `scheduler` group: each option builds from its config, keeps the head/backbone lr ratio,
has its shape, and is stepped by the Trainer at its interval."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from tests.conftest import compose_cfg
from tests.test_finetune import LR, fit, tiny

SCHEDULERS = ["none", "cosine", "plateau", "onecycle"]


def two_groups() -> torch.optim.Optimizer:
    """Adam over a head group at LR and a backbone group at LR / 10."""
    head, backbone = nn.Linear(2, 2), nn.Linear(2, 2)
    return torch.optim.Adam(
        [{"params": head.parameters()}, {"params": backbone.parameters(), "lr": LR / 10}], lr=LR
    )


def scheduler_config(name: str, tmp_path: Path, *overrides: str) -> dict:
    cfg = compose_cfg([f"scheduler={name}", "trainer.max_epochs=10", *overrides], tmp_path)
    return instantiate(cfg.scheduler, _convert_="all")


def lrs_over(name: str, tmp_path: Path, steps: int, *overrides: str) -> list[list[float]]:
    """Each group's lr before each of `steps` steps (per batch, or per epoch with a falling
    val/loss for plateau, then a flat one)."""
    config = scheduler_config(name, tmp_path, *overrides)
    optimizer = two_groups()
    kwargs = {"total_steps": steps} if config["interval"] == "step" else {}
    scheduler = config["build"](optimizer, **kwargs)
    seen = []
    for step in range(steps):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        if config["interval"] == "step":
            scheduler.step()
        else:
            scheduler.step(max(1.0, 5.0 - step))  # improves until epoch 4, then flat
    return seen


def test_none_builds_nothing(tmp_path: Path) -> None:
    assert scheduler_config("none", tmp_path)["build"] is None


@pytest.mark.parametrize("name", ["cosine", "plateau", "onecycle"])
def test_schedules_keep_the_backbone_at_its_share(name: str, tmp_path: Path) -> None:
    for head, backbone in lrs_over(name, tmp_path, 12):
        assert backbone == pytest.approx(head / 10)


def test_cosine_warms_up_then_decays_to_zero(tmp_path: Path) -> None:
    """10 epochs of 10 steps, 1 warm-up epoch: 0.1, 0.2 ... 1.0 x lr, then down to about 0."""
    head = [lrs[0] for lrs in lrs_over("cosine", tmp_path, 100)]
    assert head[:10] == pytest.approx([LR * (i + 1) / 10 for i in range(10)])
    assert all(a >= b for a, b in zip(head[9:], head[10:], strict=False))
    assert head[-1] < LR * 1e-3


def test_onecycle_peaks_at_the_optimizer_lr(tmp_path: Path) -> None:
    head = [lrs[0] for lrs in lrs_over("onecycle", tmp_path, 100)]
    assert head[0] == pytest.approx(LR / 25)
    assert max(head) == pytest.approx(LR, rel=1e-3)
    assert head.index(max(head)) == pytest.approx(30, abs=1)
    assert head[-1] < LR / 25


def test_plateau_cuts_the_lr_after_patience_epochs_without_progress(tmp_path: Path) -> None:
    head = [lrs[0] for lrs in lrs_over("plateau", tmp_path, 10)]
    assert head[:8] == pytest.approx([LR] * 8)  # best at 4; 5, 6 within patience; 7 cuts
    assert head[8] == pytest.approx(LR * 0.2)


@pytest.mark.parametrize(("name", "interval"), [("cosine", "step"), ("plateau", "epoch")])
def test_trainer_steps_each_scheduler_at_its_interval(
    name: str, interval: str, image_root: Path, tmp_path: Path
) -> None:
    cfg = tiny(image_root, tmp_path, f"scheduler={name}", "trainer.max_epochs=2")
    _, _, trainer = fit(cfg, tmp_path)
    config = trainer.lr_scheduler_configs[0]
    assert config.interval == interval
    steps = 2 * trainer.num_training_batches if interval == "step" else 2
    assert config.scheduler.last_epoch == steps
