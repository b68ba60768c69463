"""The fine-tuning options compose and do what they say: augmentation, label smoothing, early
stopping and the learning-rate finder."""

import itertools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.model.finetune import Finetune
from src.run.callbacks import EpochTimer
from src.run.devices import trainer_settings
from src.run.lr_find import find_lr
from src.train import train
from tests.conftest import compose_cfg
from tests.test_finetune import build, tiny

pytestmark = pytest.mark.usefixtures("one_thread")

FINETUNES = ["none", "full", "staged"]
SCHEDULERS = ["none", "cosine", "plateau", "onecycle"]
AUGMENTS = ["none", "light", "strong"]


@pytest.mark.parametrize(
    ("finetune", "scheduler", "augment"), itertools.product(FINETUNES, SCHEDULERS, AUGMENTS)
)
def test_every_combination_composes(finetune, scheduler, augment, tmp_path: Path) -> None:
    cfg = compose_cfg(
        [f"finetune={finetune}", f"scheduler={scheduler}", f"augment={augment}"], tmp_path
    )
    assert Finetune(**cfg.finetune).name == finetune
    built = instantiate(cfg.scheduler, _convert_="all")
    assert (built["build"] is None) == (scheduler == "none")
    transform = instantiate(cfg.data.train_transform)
    assert (transform is None) == (augment == "none")


@pytest.mark.parametrize(
    "override",
    [
        "label_smoothing=0.1",
        "early_stopping=3",
        "lr_find=true",
        "finetune=full finetune.bn=train finetune.backbone_lr_scale=0.3",
        "finetune=staged finetune.unfreeze_at_epoch=5 finetune.warmup_epochs=0.5",
        "scheduler=cosine scheduler.build.warmup_epochs=0",
        "scheduler=plateau scheduler.build.patience=5",
        "scheduler=onecycle scheduler.build.cycle_momentum=true",
    ],
)
def test_keys_compose(override: str, tmp_path: Path) -> None:
    cfg = compose_cfg(override.split(), tmp_path)
    for item in override.split():
        key, value = item.split("=")
        node = OmegaConf.select(cfg, key)
        assert str(node.name if isinstance(node, DictConfig) else node).lower() == value


@pytest.mark.parametrize("augment", ["light", "strong"])
def test_augment_keeps_shape_and_dtype(augment: str, image_root: Path, tmp_path: Path) -> None:
    cfg = tiny(image_root, tmp_path, f"augment={augment}")
    data = instantiate(cfg.data)
    data.setup()
    images = data.datasets["train"].images
    outputs = torch.stack([data.datasets["train"][i][0] for i in range(len(images))])
    assert outputs.shape == images.shape == (len(images), 3, 32, 32)
    assert outputs.dtype == torch.uint8
    assert not torch.equal(outputs, images)  # it does change the images
    assert data.datasets["val"].transform is None


def test_augmented_frozen_run_trains_on_images_not_cached_features(image_root, tmp_path):
    """No cache without the trust stage (which reads the unaugmented features through it)."""
    cfg = tiny(image_root, tmp_path, "augment=light", "trainer.max_epochs=1", "calibrate=false",
               "ood=false")  # fmt: skip
    train(cfg)
    assert not Path(cfg.cache_dir).exists()
    train(tiny(image_root, tmp_path / "plain", "trainer.max_epochs=1"))
    assert (tmp_path / "plain" / "cache").is_dir()


def test_label_smoothing_is_on_the_training_loss_only(image_root: Path, tmp_path: Path) -> None:
    model, _ = build(tiny(image_root, tmp_path, "label_smoothing=0.2"))
    features = torch.randn(6, model.head.in_features)
    batch = (features, torch.tensor([0, 1, 2, 0, 1, 2]))
    logits = model.head(features)
    plain = torch.nn.functional.cross_entropy(logits, batch[1])
    smoothed = torch.nn.functional.cross_entropy(logits, batch[1], label_smoothing=0.2)
    assert not torch.isclose(plain, smoothed)
    assert torch.isclose(model.training_step(batch), smoothed)
    assert torch.isclose(model._step(batch, "val", "val/"), plain)


def test_early_stopping_stops_when_val_loss_stalls(image_root, tmp_path, monkeypatch) -> None:
    """At lr 1e-30 no weight moves, nor val/loss: patience 1 stops after epoch 2 of 5."""
    timers: list[EpochTimer] = []

    class CountingTimer(EpochTimer):
        def __init__(self) -> None:
            super().__init__()
            timers.append(self)

    monkeypatch.setattr("src.train.EpochTimer", CountingTimer)
    overrides = ["optimizer.lr=1e-30", "trainer.max_epochs=5"]
    train(tiny(image_root, tmp_path / "stopped", *overrides, "early_stopping=1"))
    train(tiny(image_root, tmp_path / "through", *overrides))
    assert [len(timer.seconds) for timer in timers] == [2, 5]


def test_lr_find_prints_and_plots_its_suggestion(image_root: Path, tmp_path: Path, capsys):
    cfg = tiny(image_root, tmp_path, "lr_find=true")
    suggestion = train(cfg)
    out = capsys.readouterr().out
    assert f"LR_FIND suggestion={suggestion:.3g} plot=" in out and "RESULT" not in out
    assert math.isfinite(suggestion) and 1e-8 <= suggestion <= 1
    assert (tmp_path / "lr_find.png").stat().st_size > 0
    assert not (tmp_path / "checkpoints").exists()
    assert not list(tmp_path.glob(".lr_find*.ckpt"))


def test_lr_find_leaves_the_model_and_trainer_as_they_were(image_root: Path, tmp_path: Path):
    """The finder restores the weights it changed and the epoch limit it lifted."""
    cfg: DictConfig = tiny(image_root, tmp_path, "trainer.max_epochs=1")
    model, data = build(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=False, enable_progress_bar=False, **trainer_settings(cfg)
    )
    assert math.isfinite(find_lr(trainer, model, data, tmp_path))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert trainer.max_epochs == 1
