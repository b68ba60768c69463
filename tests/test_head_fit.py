"""How a head that learns alone is fitted: the linear probe (default) or the recipe's epochs;
and linear probe, then fine-tune (finetune=lpft)."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import src.frozen.cache
import src.frozen.head
import src.train
from src.data.module import ImageFolderData
from src.frozen.cache import cached_features
from src.frozen.head import fit_head_by_probe
from src.frozen.probe import fit_probe
from src.model.module import TransferModel
from src.train import run, train
from tests.conftest import FitRecord, assert_resumed, compose_cfg, tiny_overrides

LITE0 = {"_target_": "src.backbones.timm_backbone", "name": "tf_efficientnet_lite0"}
BACKBONE = LITE0 | {"weights": "imagenet"}  # shipped ImageNet weights: features with class signal


def overrides(cfg: DictConfig, *extra: str) -> list[str]:
    """tiny_overrides on `cfg`'s folder with the shipped EfficientNet-Lite0 (whose features tell
    the colour classes apart), less its head_fit, plus `extra`."""
    base = [
        o
        for o in tiny_overrides(cfg.data.root)
        if not o.startswith(("head_fit", "backbone.weights"))
    ] + ["backbone=efficientnet_lite0"]
    replaced = {e.split("=")[0] for e in extra}
    return [o for o in base if o.split("=")[0] not in replaced] + list(extra)


def test_probe_is_the_default_and_is_still_a_lightning_run(tiny_cfg: DictConfig, capsys) -> None:
    out = Path(tiny_cfg.output_dir)
    cfg = compose_cfg(overrides(tiny_cfg, "logger=tensorboard", "trainer.max_epochs=7"), out)
    train(cfg)
    result = json.loads((out / "result.json").read_text())
    assert result["head_fit"] == "probe" and result["best_epoch"] == 0  # one epoch, not 7
    assert (out / "checkpoints/best.ckpt").is_file() and (out / "checkpoints/last.ckpt").is_file()
    assert result["test/acc"] == 1.0  # the colour classes are linearly separable in features
    assert "head_fit=probe" in capsys.readouterr().out
    events = EventAccumulator(str(out))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"probe/val_loss", "probe/val_acc", "probe/l2", "probe/chosen_l2"} <= scalars
    assert len(events.Scalars("probe/val_loss")) == 10  # one point per grid value
    assert events.Scalars("probe/chosen_l2")[0].value == pytest.approx(result["probe_l2"])


def test_the_probe_never_reads_the_test_split(tiny_cfg: DictConfig) -> None:
    data: ImageFolderData = ImageFolderData(str(tiny_cfg.data.root), image_size=32)
    model = TransferModel(dict(tiny_cfg.backbone), data.classes, 32)
    features = cached_features(
        model, data, dict(tiny_cfg.backbone), None, torch.device("cpu"), bf16=False
    )
    cfg = compose_cfg(overrides(tiny_cfg), Path(tiny_cfg.output_dir))
    chosen = fit_head_by_probe(
        model, data, {k: features[k] for k in ("train", "val")}, cfg, None, "trainval"
    )
    head = model.head.weight.clone()
    poisoned = {**features, "test": torch.full_like(features["test"], float("nan"))}
    assert fit_head_by_probe(model, data, poisoned, cfg, None, "trainval") == chosen
    assert torch.equal(model.head.weight, head)


def test_with_augmentation_the_probe_gives_way_to_the_recipe(tiny_cfg, caplog) -> None:
    out = Path(tiny_cfg.output_dir)
    train(compose_cfg(overrides(tiny_cfg, "augment=light", "trainer.max_epochs=1"), out))
    assert json.loads((out / "result.json").read_text())["head_fit"] == "recipe"
    assert "head_fit=probe fits the head on cached features" in caplog.text


def test_lpft_fine_tunes_from_the_probes_head(tiny_cfg: DictConfig, monkeypatch) -> None:
    seen = {}

    def recording_probe(*args, **kwargs):
        seen["probe"] = fit_probe(*args, **kwargs)
        return seen["probe"]

    def on_fit_start(model: TransferModel) -> None:
        seen["head"] = model.head.weight.detach().clone()
        seen["bias"] = model.head.bias.detach().clone()
        seen["stem"] = model.backbone.conv_stem.weight.detach().clone()

    monkeypatch.setattr(src.frozen.head, "fit_probe", recording_probe)
    monkeypatch.setattr(TransferModel, "on_fit_start", on_fit_start)
    out = Path(tiny_cfg.output_dir)
    train(compose_cfg(overrides(tiny_cfg, "finetune=lpft", "trainer.max_epochs=1"), out))
    probe = seen["probe"]
    assert torch.equal(seen["head"], probe.weight) and torch.equal(seen["bias"], probe.bias)
    last = torch.load(out / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert not torch.equal(last["head.weight"], probe.weight)  # then everything learns
    assert not torch.equal(last["backbone.conv_stem.weight"], seen["stem"])


@pytest.mark.slow
def test_lpft_resumes_exactly(tiny_cfg: DictConfig, fits: list[FitRecord]) -> None:
    parent = Path(tiny_cfg.output_dir).parent
    settings = ["finetune=lpft", "optimizer=adam"]
    train(compose_cfg(overrides(tiny_cfg, *settings, "trainer.max_epochs=2"), parent / "straight"))
    train(compose_cfg(overrides(tiny_cfg, *settings, "trainer.max_epochs=1"), parent / "killed"))
    last = parent / "killed/checkpoints/last.ckpt"
    resumed = [*settings, "trainer.max_epochs=2", f"ckpt_path={last}"]
    train(compose_cfg(overrides(tiny_cfg, *resumed), parent / "resumed"))
    straight = torch.load(parent / "straight/checkpoints/last.ckpt", weights_only=True)
    again = torch.load(parent / "resumed/checkpoints/last.ckpt", weights_only=True)
    assert straight["epoch"] == again["epoch"] == 1
    assert_resumed(fits[2], last, straight=fits[0])
    for name, tensor in straight["state_dict"].items():
        assert torch.equal(again["state_dict"][name], tensor), name


@pytest.mark.slow
def test_folds_cross_validate_in_one_command_and_extract_once(tiny_cfg, monkeypatch) -> None:
    calls = []
    real = src.frozen.cache.extract_folder
    monkeypatch.setattr(
        src.frozen.cache, "extract_folder", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    out = Path(tiny_cfg.output_dir)
    objective = run(compose_cfg(overrides(tiny_cfg, "folds=3"), out))
    assert len(calls) == 1  # a frozen backbone's features, once for all folds
    lines = (out / "cv.csv").read_text().splitlines()
    assert lines[0].startswith("fold,val/acc,test/acc")
    assert [line.split(",")[0] for line in lines[1:]] == ["0", "1", "2", "mean", "std"]
    folds = [json.loads((out / f"fold-{i}/result.json").read_text()) for i in range(3)]
    assert [f["split"]["fold"] for f in folds] == [0, 1, 2]
    assert objective == pytest.approx(sum(f["val/acc"] for f in folds) / 3)
    assert json.loads((out / "result.json").read_text())["folds"] == 3
    assert "val/acc:" in (out / "cv.md").read_text()
