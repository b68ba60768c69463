"""Every config option composes, with the published defaults."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR, compose_cfg

GROUPS = {
    group.name: sorted(p.stem for p in group.glob("*.yaml"))
    for group in Path(CONF_DIR).iterdir()
    if group.is_dir() and group.name != "hydra"
}
OPTIONS = [(group, option) for group, options in GROUPS.items() for option in options]


def test_defaults_are_the_published_experiment(tmp_path):
    cfg = compose_cfg([], tmp_path)
    assert cfg.backbone.name == "mobilenet_v2" and cfg.backbone.weights == "IMAGENET1K_V1"
    assert cfg.freeze is True and cfg.image_size == 160 and cfg.batch_size == 32
    assert cfg.trainer.max_epochs == 50 and cfg.data.val_fraction == 0.1
    optimizer = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, torch.optim.RMSprop) and optimizer.defaults["lr"] == 1e-4


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_every_option_composes(tmp_path, group, option):
    overrides = [f"{group}={option}", "data.root=somewhere"]
    cfg = compose_cfg(overrides, tmp_path)
    OmegaConf.resolve(cfg)
    if group not in {"experiment", "hparams_search"}:  # those two write global keys
        assert cfg[group] is not None


@pytest.mark.parametrize("value", ["true", "false"])
def test_freeze_is_a_boolean_key(tmp_path, value):
    assert compose_cfg([f"freeze={value}"], tmp_path).freeze is (value == "true")


def test_trainer_debug_keeps_logging_and_checkpointing(tmp_path):
    trainer = compose_cfg(["trainer=debug"], tmp_path).trainer
    assert trainer.max_epochs == 1 and trainer.limit_train_batches == 2
    assert "fast_dev_run" not in trainer
