"""Unbalanced classes: class_weights=auto weighs the loss, sampler=balanced draws each class
equally often, both resume exactly, and a run on unbalanced data says so once."""

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from src.data.module import ImageFolderData
from src.data.sampling import EpochBalanced
from src.train import build_model, train
from tests.conftest import assert_resumed, compose_cfg, make_folder, tiny_overrides


def unbalanced(root: Path) -> Path:
    """12 images of class_0, 4 of class_1 and class_2 (3x or more: a warning)."""
    make_folder(root, per_class=12, validation=2)
    for c in (1, 2):
        for i in range(4, 12):
            (root / "training" / f"class_{c}" / f"image{i}.png").unlink()
    return root


def test_class_weights_auto_weigh_the_training_loss_only(tmp_path: Path) -> None:
    root = unbalanced(tmp_path / "data")
    cfg = compose_cfg([*tiny_overrides(root), "class_weights=auto"], tmp_path / "run")
    data = ImageFolderData(str(root), image_size=32, seed=42, test_fraction=0)
    model = build_model(cfg, data)
    counts = torch.bincount(torch.tensor(data.train_split.labels)).double()
    expected = counts.sum() / (3 * counts)
    torch.testing.assert_close(model.class_weights.double(), expected)
    features, labels = torch.randn(6, 1280), torch.tensor([0, 0, 0, 0, 1, 2])
    train_loss = model.training_step((features, labels))
    logits = model.head(features)
    weighted = F.cross_entropy(logits, labels, weight=model.class_weights)
    torch.testing.assert_close(train_loss, weighted)
    assert not torch.allclose(train_loss, F.cross_entropy(logits, labels))
    model._step((features, labels), "val", "val/")  # val stays unweighted: comparable
    val = model.metrics["val_metrics"]["loss"].compute()
    torch.testing.assert_close(val, F.cross_entropy(logits, labels))


def test_balanced_sampler_draws_each_class_equally_often_and_per_epoch() -> None:
    labels = [0] * 80 + [1] * 10 + [2] * 10
    sampler = EpochBalanced(labels, seed=3)
    drawn = []
    for epoch in range(30):
        sampler.set_epoch(epoch)
        drawn += [labels[i.index] for i in sampler]
    shares = torch.bincount(torch.tensor(drawn)).double() / len(drawn)
    assert torch.allclose(shares, torch.full((3,), 1 / 3, dtype=torch.double), atol=0.03)
    sampler.set_epoch(5)
    first = list(sampler)
    again = EpochBalanced(labels, seed=3)
    again.set_epoch(5)
    assert list(again) == first  # the seed and epoch alone: a resumed run draws the same
    again.set_epoch(6)
    assert list(again) != first


@pytest.mark.slow
def test_unbalanced_data_warns_once_and_both_options_resume_exactly(tmp_path, caplog, fits):
    root = unbalanced(tmp_path / "data")
    base = [*tiny_overrides(root), "freeze=false", "optimizer=adam", "class_weights=auto",
            "sampler=balanced"]  # fmt: skip
    with caplog.at_level(logging.WARNING):
        train(compose_cfg([*base, "class_weights=null", "sampler=shuffle",
                           "trainer.max_epochs=1"], tmp_path / "plain"))  # fmt: skip
    assert caplog.text.count("unbalanced classes: class_0 has") == 1
    assert "class_weights=auto" in caplog.text and "sampler=balanced" in caplog.text
    train(compose_cfg([*base, "trainer.max_epochs=2"], tmp_path / "straight"))
    train(compose_cfg([*base, "trainer.max_epochs=1"], tmp_path / "killed"))
    last = tmp_path / "killed/checkpoints/last.ckpt"
    train(compose_cfg([*base, "trainer.max_epochs=2", f"ckpt_path={last}"], tmp_path / "resumed"))
    assert_resumed(fits[3], last, straight=fits[1])  # fits: plain, straight, killed, resumed
    straight = torch.load(tmp_path / "straight/checkpoints/last.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=True)
    for name, tensor in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], tensor), name
