"""End-to-end training: what a frozen and an unfrozen run change, what a run writes."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from omegaconf import DictConfig, OmegaConf, open_dict

from src.train import train
from tests.conftest import CONF_DIR

ROOT = Path(CONF_DIR).parent


def weights_file(tmp_path: Path) -> Path:
    """Random MobileNetV2 weights saved as a file, so the starting backbone is known exactly."""
    torch.manual_seed(1)
    path = tmp_path / "start.pth"
    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), path)
    return path


def run(cfg: DictConfig, **overrides: Any) -> dict[str, torch.Tensor]:
    """Train a copy of `cfg` with dotted-key `overrides`; return the last checkpoint's state."""
    cfg = cfg.copy()
    with open_dict(cfg):
        for key, value in overrides.items():
            OmegaConf.update(cfg, key, value, merge=False)
    train(cfg)
    last = Path(cfg.output_dir) / "checkpoints" / "last.ckpt"
    return torch.load(last, weights_only=False)["state_dict"]


def backbone_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}


def test_frozen_run_leaves_the_backbone_bitwise_unchanged(tiny_cfg, tmp_path):
    start = weights_file(tmp_path)
    state = run(tiny_cfg, **{"backbone.weights": str(start), "cache_features": False})
    reference = {k: v for k, v in torch.load(start).items() if k.startswith("features.")}
    backbone = backbone_of(state)
    assert backbone.keys() == reference.keys()  # weights and BatchNorm buffers alike
    for name, tensor in reference.items():
        assert torch.equal(backbone[name], tensor), name


def test_frozen_head_changes_during_training(tiny_cfg):
    first = run(tiny_cfg, **{"trainer.max_epochs": 1})
    longer = run(tiny_cfg, **{"trainer.max_epochs": 3, "output_dir": tiny_cfg.output_dir + "_3"})
    assert not torch.equal(first["head.weight"], longer["head.weight"])
    assert torch.equal(
        first["backbone.features.0.0.weight"], longer["backbone.features.0.0.weight"]
    )


def test_unfrozen_run_changes_the_backbone(tiny_cfg, tmp_path):
    start = weights_file(tmp_path)
    state = run(tiny_cfg, **{"backbone.weights": str(start), "freeze": False})
    reference = torch.load(start)
    assert not torch.equal(state["backbone.features.0.0.weight"], reference["features.0.0.weight"])
    assert not torch.equal(
        state["backbone.features.0.1.running_mean"], reference["features.0.1.running_mean"]
    )


@pytest.mark.slow
def test_cached_and_plain_frozen_training_give_the_same_head(tiny_cfg):
    plain = run(tiny_cfg, cache_features=False, output_dir=tiny_cfg.output_dir + "_plain")
    cached = run(tiny_cfg, cache_features=True, output_dir=tiny_cfg.output_dir + "_cached")
    torch.testing.assert_close(cached["head.weight"], plain["head.weight"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cached["head.bias"], plain["head.bias"], rtol=1e-4, atol=1e-5)
    assert list(Path(tiny_cfg.cache_dir).glob("*.pt"))  # the features were kept on disk


@pytest.mark.slow
def test_same_seed_gives_the_same_metrics(tiny_cfg):
    first = run(tiny_cfg, output_dir=tiny_cfg.output_dir + "_a", cache_dir=None)
    second = run(tiny_cfg, output_dir=tiny_cfg.output_dir + "_b", cache_dir=None)
    assert torch.equal(first["head.weight"], second["head.weight"])
    results = [
        json.loads((Path(tiny_cfg.output_dir + s) / "result.json").read_text())
        for s in ("_a", "_b")
    ]
    assert results[0]["test/acc"] == results[1]["test/acc"]
    assert results[0]["test/loss"] == results[1]["test/loss"]


@pytest.mark.slow
def test_command_line_run_writes_events_checkpoints_and_result(image_root, tmp_path):
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "src.train", "backbone.weights=null", "data=imagefolder",
        f"data.root={image_root}", "image_size=32", "trainer=debug", "trainer.accelerator=cpu",
        f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=os.environ
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert "Total params: 2,227,715" in lines and "Trainable params: 3,843" in lines
    result = [line for line in lines if line.startswith("RESULT ")]
    assert len(result) == 1
    assert "backbone=mobilenet_v2 freeze=True head_fit=probe before_test_acc=" in result[0]
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    written = json.loads((run_dir / "result.json").read_text())
    assert written["trainable_params"] == 3843
    # from the process's start, before the run ended (no wall-clock bound: bench/ measures speed)
    assert 0 < written["first_batch_s"] < elapsed - written["mean_epoch_s"]
    # the training loop, its checkpoint writes included, within the run and after the first batch
    assert written["mean_epoch_s"] <= written["fit_s"] < elapsed - written["first_batch_s"]
