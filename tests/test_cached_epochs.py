"""A head trained on cached features takes each epoch's minibatches in one Lightning step
(FeatureChunks, TransferModel.train_on_chunks): the same steps, schedules and metrics
as one Lightning step per minibatch."""

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

import src.frozen.head
import src.train
from src.data.sampling import EpochShuffle
from src.frozen.batches import EpochBatches, FeatureChunks, FeaturesDataset, minibatches
from src.model.module import TransferModel
from tests.conftest import compose_cfg, tiny_overrides


def run(cfg: DictConfig, out: str, **overrides: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train a copy of `cfg` into `out` with dotted-key `overrides`: (result.json, last.ckpt)."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.output_dir = str(Path(cfg.output_dir).parent / out)
        for key, value in overrides.items():
            OmegaConf.update(cfg, key, value, merge=False)
    src.train.train(cfg)
    folder = Path(cfg.output_dir)
    result = json.loads((folder / "result.json").read_text())
    return result, torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)


METRICS = ["before/test_loss", "before/test_acc", "test/loss", "test/acc", "val/acc"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"trainer.max_epochs": 3},
        {"trainer.max_epochs": 3, "scheduler": "onecycle"},
        {"trainer.max_epochs": 4, "sampler": "balanced", "class_weights": "auto"},
    ],
    ids=["constant", "onecycle", "balanced"],
)
def test_chunked_epochs_match_one_step_per_minibatch(
    tiny_cfg: DictConfig, monkeypatch: pytest.MonkeyPatch, overrides: dict[str, Any]
) -> None:
    if "scheduler" in overrides:  # a config group: compose it in
        weights = tiny_cfg.backbone.weights
        tiny_cfg = compose_cfg(
            [*tiny_overrides(tiny_cfg.data.root, weights), f"scheduler={overrides['scheduler']}"],
            Path(tiny_cfg.output_dir),
        )
        overrides = {k: v for k, v in overrides.items() if k != "scheduler"}
    chunked, chunked_ckpt = run(tiny_cfg, "chunks", **overrides)
    monkeypatch.setattr(src.frozen.head, "trains_on_chunks", lambda trainer, cfg: False)
    stepped, stepped_ckpt = run(tiny_cfg, "steps", **overrides)

    assert {m: chunked[m] for m in METRICS} == {m: stepped[m] for m in METRICS}
    assert chunked["best_epoch"] == stepped["best_epoch"]
    assert (
        chunked_ckpt["global_step"] == stepped_ckpt["global_step"] > overrides["trainer.max_epochs"]
    )  # one optimizer step per minibatch in both
    for name in ("head.weight", "head.bias"):
        assert torch.equal(chunked_ckpt["state_dict"][name], stepped_ckpt["state_dict"][name])
    assert chunked_ckpt["lr_schedulers"] == stepped_ckpt["lr_schedulers"]
    state = chunked_ckpt["optimizer_states"][0]["state"]
    reference = stepped_ckpt["optimizer_states"][0]["state"]
    assert all(torch.equal(state[0][k], reference[0][k]) for k in reference[0])


def test_a_cached_run_trains_on_chunks(tiny_cfg: DictConfig, monkeypatch: pytest.MonkeyPatch):
    calls: list[int] = []
    original = TransferModel.train_on_chunks

    def spy(self: TransferModel, steps: int) -> None:
        calls.append(steps)
        original(self, steps)

    monkeypatch.setattr(TransferModel, "train_on_chunks", spy)
    _, ckpt = run(tiny_cfg, "spied", **{"trainer.max_epochs": 2})
    assert len(calls) == 1 and calls[0] >= 2
    assert ckpt["global_step"] == 2 * calls[0]


@pytest.mark.parametrize(
    ("setting", "chunks"),
    [
        ({}, True),
        ({"limit_train_batches": 2}, False),
        ({"limit_val_batches": 0.5}, False),
        ({"gradient_clip_val": 1.0}, False),
        ({"accumulate_grad_batches": 2}, False),
        ({"max_steps": 10}, False),
        ({"val_check_interval": 0.5}, False),
        ({"fast_dev_run": True}, False),
    ],
)
def test_trainer_settings_that_count_minibatches_keep_one_step_each(
    setting: dict[str, Any], chunks: bool
) -> None:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, **setting)
    cfg = OmegaConf.create({"lr_find": False, "scheduler": {"interval": "step"}})
    assert src.frozen.head.trains_on_chunks(trainer, cfg) is chunks
    finder = OmegaConf.merge(cfg, {"lr_find": True})
    plateau = OmegaConf.merge(cfg, {"scheduler": {"interval": "epoch"}})  # Lightning steps it
    assert not src.frozen.head.trains_on_chunks(trainer, finder)
    assert not src.frozen.head.trains_on_chunks(trainer, plateau)


def test_epoch_batches_hold_the_minibatches_of_the_epochs_shuffle() -> None:
    shuffle = EpochShuffle(10, seed=3)
    batches = EpochBatches(torch.utils.data.BatchSampler(shuffle, 4, drop_last=False))
    shuffle.set_epoch(2)
    plain = list(torch.utils.data.BatchSampler(shuffle, 4, drop_last=False))
    assert len(batches) == 1 and batches.sampler is shuffle
    (whole,) = list(batches)
    assert whole == plain and [len(b) for b in whole] == [4, 4, 2]

    features, labels = torch.randn(10, 5), torch.arange(10)
    chunk = FeaturesDataset(features, labels).__getitems__(whole)
    assert isinstance(chunk, FeatureChunks) and len(chunk) == 3
    moved = chunk.to("cpu")
    for (x, y), keys in zip(minibatches(moved), whole, strict=True):
        rows = [k[1] for k in keys]
        assert torch.equal(x, features[rows]) and torch.equal(y, labels[rows])
    single = (features[:2], labels[:2])
    assert list(minibatches(single)) == [single]
