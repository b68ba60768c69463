"""Fine-tuning strategies: param groups and lrs, unfreezing, resume, BatchNorm, warm-up."""

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from src.model.finetune import Finetune, batchnorm_layers
from src.model.module import TransferModel
from src.run.errors import UserError
from src.train import build_model, train
from tests.conftest import compose_cfg

LR = 1e-3


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


def tiny(image_root: Path, out: Path, *overrides: str) -> DictConfig:
    """The tiny CPU run (see conftest) for 3 epochs of Adam, then `overrides`."""
    return compose_cfg(
        [
            "head_fit=recipe",
            "backbone.weights=null",
            "data=imagefolder",
            f"data.root={image_root}",
            "image_size=32",
            "batch_size=7",  # 21 training images: 3 full batches
            "trainer=cpu",
            "trainer.max_epochs=3",
            "logger=none",
            "precision=32-true",
            "optimizer=adam",
            f"optimizer.lr={LR}",
            *overrides,
        ],
        out,
    )


def staged_cfg(image_root: Path, out: Path, *overrides: str) -> DictConfig:
    """`tiny`, staged: the head alone in epoch 0, the backbone learning from epoch 1 at
    0.1 x the lr without warm-up; then `overrides`."""
    staged = ["finetune=staged", "finetune.unfreeze_at_epoch=1", "finetune.warmup_epochs=0"]
    return tiny(image_root, out, *staged, *overrides)


def build(cfg: DictConfig) -> tuple[TransferModel, L.LightningDataModule]:
    """The model and data that `train(cfg)` builds."""
    data = instantiate(cfg.data)
    return build_model(cfg, data), data


def state(trainer: L.Trainer, model: TransferModel) -> dict:
    """Param group names, sizes and lrs, which backbone parameters learn, BatchNorm modes."""
    return {
        "groups": [
            (g.get("name"), len(g["params"]), pytest.approx(g["lr"]))
            for g in trainer.optimizers[0].param_groups
        ],
        "backbone_requires_grad": {p.requires_grad for p in model.backbone.parameters()},
        "model_training": model.training,
        "bn_training": {m.training for m in batchnorm_layers(model.backbone)},
    }


class Recorder(L.Callback):
    """The optimizer's and backbone's state at each epoch's first batch (after the module's
    epoch-start hook), the backbone's lr at each optimizer step; can stop after an epoch."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.start: dict[int, dict] = {}
        self.backbone_lrs: list[float] = []
        self.stop_after = stop_after

    def on_fit_start(self, trainer, model) -> None:
        self.backbone_at_start = {k: v.clone() for k, v in model.backbone.state_dict().items()}

    def on_train_batch_start(self, trainer, model, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.start[trainer.current_epoch] = state(trainer, model)

    def on_before_optimizer_step(self, trainer, model, optimizer) -> None:
        self.backbone_lrs.append(optimizer.param_groups[-1]["lr"])

    def on_train_epoch_end(self, trainer, model) -> None:
        if trainer.current_epoch == self.stop_after:
            trainer.should_stop = True


def fit(
    cfg: DictConfig, out: Path, stop_after: int | None = None, ckpt_path: str | None = None
) -> tuple[Recorder, TransferModel, L.Trainer]:
    """Fit `cfg`'s model on CPU with a Recorder, keeping `out`/last.ckpt fresh every epoch."""
    L.seed_everything(cfg.seed, workers=True)
    model, data = build(cfg)
    recorder = Recorder(stop_after)
    last = ModelCheckpoint(out, "last", enable_version_counter=False)
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        logger=False,
        callbacks=[recorder, last],
        enable_progress_bar=False,
        default_root_dir=str(out),
    )
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return recorder, model, trainer


def test_frozen_run_keeps_one_head_only_group(tiny_cfg: DictConfig) -> None:
    """finetune=none freeze=true, as before: only the head's parameters reach the optimizer."""
    model, _ = build(tiny_cfg)
    optimizer = model.configure_optimizers()
    assert len(optimizer.param_groups) == 1
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {
        id(p) for p in model.head.parameters()
    }
    assert not model.backbone.training


def test_full_has_both_groups_and_lrs_from_the_start(image_root: Path, tmp_path: Path) -> None:
    cfg = tiny(image_root, tmp_path, "finetune=full", "finetune.backbone_lr_scale=0.25")
    model, _ = build(cfg)
    head, backbone = model.configure_optimizers().param_groups
    assert (head["name"], backbone["name"]) == ("head", "backbone")
    assert head["lr"] == pytest.approx(LR) and backbone["lr"] == pytest.approx(0.25 * LR)
    assert len(backbone["params"]) == len(list(model.backbone.parameters()))
    assert all(p.requires_grad for p in model.parameters())


def test_staged_groups_and_lrs_before_and_after_unfreezing(image_root: Path, tmp_path: Path):
    recorder, model, _ = fit(staged_cfg(image_root, tmp_path), tmp_path)
    n_backbone = len(list(model.backbone.parameters()))
    groups = [("head", 2, pytest.approx(LR)), ("backbone", n_backbone, pytest.approx(LR / 10))]
    frozen = {"backbone_requires_grad": {False}, "bn_training": {False}}
    learning = {"backbone_requires_grad": {True}, "bn_training": {False}}  # bn=frozen
    assert recorder.start[0] == {"groups": groups, "model_training": True, **frozen}
    assert recorder.start[1] == {"groups": groups, "model_training": True, **learning}
    assert recorder.start[2] == {"groups": groups, "model_training": True, **learning}


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["none", "cosine", "plateau", "onecycle"])
@pytest.mark.parametrize("stop_after", [0, 1])
def test_resume_across_the_unfreeze_epoch(
    image_root: Path, tmp_path: Path, scheduler: str, stop_after: int
) -> None:
    """Stopped before (0) or after (1) unfreezing and resumed from last.ckpt, a run has the same
    param groups, lrs, requires_grad and BatchNorm modes as one that ran straight through."""
    cfg = staged_cfg(image_root, tmp_path, f"scheduler={scheduler}")
    through, _, _ = fit(cfg, tmp_path / "through")
    fit(cfg, tmp_path / "stopped", stop_after=stop_after)
    last = tmp_path / "stopped" / "last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] == stop_after
    resumed, model, _ = fit(cfg, tmp_path / "resumed", ckpt_path=str(last))
    assert sorted(resumed.start) == list(range(stop_after + 1, 3))
    for epoch, seen in resumed.start.items():
        assert seen == through.start[epoch]
    assert all(p.requires_grad for p in model.backbone.parameters())


@pytest.mark.parametrize("bn", ["frozen", "train"])
def test_batchnorm_after_unfreezing(image_root: Path, tmp_path: Path, bn: str) -> None:
    """bn=frozen: BatchNorm layers stay in eval mode and keep their running statistics while
    their weights learn; bn=train: they train and their statistics move."""
    cfg = tiny(image_root, tmp_path, "finetune=full", f"finetune.bn={bn}")
    recorder, model, _ = fit(cfg, tmp_path)
    before, after = recorder.backbone_at_start, model.backbone.state_dict()
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    weights = [name for name, _ in model.backbone.named_parameters()]
    assert stats
    unchanged = [torch.equal(before[k], after[k]) for k in stats]
    assert all(unchanged) if bn == "frozen" else not any(unchanged)
    assert all(epoch["bn_training"] == {bn == "train"} for epoch in recorder.start.values())
    assert not all(torch.equal(before[k], after[k]) for k in weights)


def test_backbone_warms_up_after_unfreezing(image_root: Path, tmp_path: Path) -> None:
    """With warmup_epochs=1 the backbone's steps use lr 0 while it is frozen, then (i+1)/n x its
    lr in the unfreeze epoch; the group's lr itself stays the scheduled one."""
    cfg = staged_cfg(image_root, tmp_path, "finetune.warmup_epochs=1", "trainer.max_epochs=2")
    recorder, _, trainer = fit(cfg, tmp_path)
    n = trainer.num_training_batches
    expected = [0.0] * n + [LR / 10 * (i + 1) / n for i in range(n)]
    assert recorder.backbone_lrs == pytest.approx(expected)
    assert trainer.optimizers[0].param_groups[1]["lr"] == pytest.approx(LR / 10)


def test_warmup_factor() -> None:
    staged = Finetune("staged", 0.1, unfreeze_at_epoch=2, warmup_epochs=2)
    assert staged.backbone_lr_factor(2, 0, 4) == pytest.approx(1 / 8)
    assert staged.backbone_lr_factor(3, 3, 4) == pytest.approx(1.0)
    assert staged.backbone_lr_factor(5, 0, 4) == 1.0
    assert Finetune("full", 0.1, warmup_epochs=2).backbone_lr_factor(0, 0, 4) == 1.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["finetune.bn=moving"], "finetune.bn"),
        (["finetune.backbone_lr_scale=0"], "backbone_lr_scale"),
        (["finetune.unfreeze_at_epoch=3"], "never learn"),
        (["cache_features=true"], "cache_features=true"),
    ],
)
def test_bad_settings_stop_with_one_line(image_root, tmp_path, overrides, message) -> None:
    with pytest.raises(UserError, match=message):
        train(staged_cfg(image_root, tmp_path, *overrides))


def test_staged_train_run_resumes_with_its_groups(image_root, tmp_path, capsys, fits) -> None:
    """Through `train`: staged skips the feature cache and says so in RESULT; its checkpoint
    holds both groups at their lrs and resumes into a longer run."""
    cfg = staged_cfg(image_root, tmp_path / "run", "trainer.max_epochs=2")
    train(cfg)
    assert "freeze=False finetune=staged" in capsys.readouterr().out
    assert not Path(cfg.cache_dir).exists()
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False)
    optimizer = ckpt["optimizer_states"][0]
    groups = optimizer["param_groups"]
    assert [(g["name"], g["lr"]) for g in groups] == [("head", LR), ("backbone", LR / 10)]
    backbone_learned = [i in optimizer["state"] for i in groups[1]["params"]]
    assert all(backbone_learned) if ckpt["epoch"] >= 1 else not any(backbone_learned)
    resumed = staged_cfg(
        image_root, tmp_path / "resumed", "trainer.max_epochs=3", f"ckpt_path={last}"
    )
    train(resumed)
    assert "RESULT" in capsys.readouterr().out
    (first, again) = fits
    assert again.start_step == ckpt["global_step"] == first.end_step > 0
    assert again.epochs == [2] and again.end_step == first.end_step * 3 // 2
