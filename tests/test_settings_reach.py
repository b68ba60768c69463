"""Each setting that changes training reaches the run a user starts: composed like the command
line, through `train`, observed where it acts (the training loss's inputs, the backbone's
inputs and outputs, the trainer and data module, the checkpoint). A setting dropped on its way
makes one of these fail; the unit tests elsewhere check what each part does with it."""

import inspect
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import DictConfig

from src.train import train
from tests.conftest import calibrated_mobilenet_v2, compose_cfg, tiny_overrides
from tests.test_imbalance import unbalanced

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def losses(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Every cross-entropy the run computes: targets, logits, class weights, label smoothing,
    and whether it trains (called from `training_step`, not from evaluation, the probe or the
    temperature fit)."""
    calls: list[dict] = []
    real = torch.nn.functional.cross_entropy

    def cross_entropy(logits, target, weight=None, *args, label_smoothing=0.0, **kwargs):
        calls.append(
            {"training": any(f.function == "training_step" for f in inspect.stack(0)),
             "target": target.clone(),
             "logits": logits.detach().float().clone(), "weight": weight,
             "label_smoothing": label_smoothing}
        )  # fmt: skip
        return real(logits, target, weight, *args, label_smoothing=label_smoothing, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", cross_entropy)
    return calls


@pytest.fixture
def calibrated(image_root: Path, tmp_path: Path) -> Path:
    """A MobileNetV2 whose features depend on the image (see conftest)."""
    return calibrated_mobilenet_v2(image_root, tmp_path / "calibrated.pth")


def run(root: Path, out: Path, weights: Path | str, *overrides: str) -> DictConfig:
    """`train` the tiny CPU run on `root` with `overrides`; its config."""
    cfg = compose_cfg([*tiny_overrides(root, weights), *overrides], out)
    train(cfg)
    return cfg


@pytest.mark.parametrize("sampler", ["shuffle", "balanced"])
def test_sampler_reaches_the_batches_that_train(tmp_path, losses, sampler) -> None:
    """On 12/4/4 images, balanced draws each class about a third of the time over 6 epochs;
    shuffle draws class_0 as often as it is there (the control)."""
    root = unbalanced(tmp_path / "data")
    run(root, tmp_path / "run", "null", f"sampler={sampler}", "trainer.max_epochs=6")
    drawn = torch.cat([c["target"] for c in losses if c["training"]])
    shares = torch.bincount(drawn, minlength=3).double() / len(drawn)
    if sampler == "balanced":
        assert (shares - 1 / 3).abs().max() < 0.1, shares
    else:
        assert shares[0] > 0.5, shares


def test_class_weights_and_label_smoothing_reach_the_training_loss(tmp_path, losses) -> None:
    root = unbalanced(tmp_path / "data")
    run(root, tmp_path / "run", "null", "class_weights=auto", "label_smoothing=0.1")
    training = [c for c in losses if c["training"]]
    evaluating = [c for c in losses if not c["training"]]
    assert training and evaluating
    counts = torch.tensor([12.0, 4.0, 4.0])  # less the val images, one per class here or none
    for call in training:
        assert call["label_smoothing"] == 0.1
        weight = call["weight"]
        assert weight is not None and weight.argmin() == 0  # the common class weighs least
        assert weight[1] / weight[0] == pytest.approx(counts[0] / counts[1], rel=0.3)
    assert all(c["weight"] is None and c["label_smoothing"] == 0.0 for c in evaluating)


@pytest.mark.parametrize("augment", ["none", "light"])
def test_augment_reaches_the_images_that_train(image_root, tmp_path, calibrated, losses, augment):
    """An lr too small to move a weight, 2 epochs: unaugmented, both epochs' training logits are
    the same set (the same images); augmented, they differ (other pixels each epoch)."""
    run(image_root, tmp_path / "run", calibrated, f"augment={augment}", "optimizer.lr=1e-30")
    logits = torch.cat([c["logits"] for c in losses if c["training"]])
    first, second = logits.chunk(2)
    assert logits.std(0).min() > 1e-3  # the logits depend on the image
    nearest = torch.cdist(first, second).min(1).values  # each epoch-0 row's closest in epoch 1
    matched = int((nearest < 1e-4).sum())
    # 21 training images, 5 full batches of 4: each epoch leaves out one image, maybe another
    assert matched >= len(first) - 1 if augment == "none" else matched == 0


@pytest.mark.parametrize("bn", ["frozen", "train"])
def test_finetune_bn_reaches_the_backbone_statistics(image_root, tmp_path, calibrated, bn):
    """A full fine-tune: bn=frozen keeps every BatchNorm's running statistics of the weights
    file, bn=train moves them all."""
    cfg = run(image_root, tmp_path / "run", calibrated, "finetune=full", f"finetune.bn={bn}",
              "trainer.max_epochs=1")  # fmt: skip
    start = torch.load(calibrated, weights_only=True)
    last = torch.load(Path(cfg.output_dir) / "checkpoints/last.ckpt", weights_only=True)
    stats = [k for k in start if k.endswith(("running_mean", "running_var"))]
    assert stats
    kept = [torch.equal(last["state_dict"][f"backbone.{k}"], start[k]) for k in stats]
    assert all(kept) if bn == "frozen" else not any(kept)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (["precision=bf16-mixed", "memory_format=channels_last", "data.in_memory=false"],
         {"precision": "bf16-mixed", "dtype": torch.bfloat16, "channels_last": True,
          "streaming": True}),
        (["precision=32-true", "memory_format=contiguous", "data.in_memory=true"],
         {"precision": "32-true", "dtype": torch.float32, "channels_last": False,
          "streaming": False}),
    ],
)  # fmt: skip
def test_precision_memory_format_and_in_memory_reach_the_training_run(
    image_root, tmp_path, monkeypatch, settings, expected
) -> None:
    """Seen in the fit itself: the trainer's precision, the backbone's output dtype and input
    layout in training steps, and whether the data module streams the images."""
    seen: dict = {}
    real = L.Trainer.fit

    def fit(trainer: L.Trainer, model: L.LightningModule, *args: object, **kwargs: object):
        def inputs(module: torch.nn.Module, args: tuple) -> None:
            if module.training or torch.is_grad_enabled():
                x = args[0]
                seen["channels_last"] = x.is_contiguous(memory_format=torch.channels_last)

        def outputs(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            if torch.is_grad_enabled():
                seen["dtype"] = output.dtype

        model.backbone.register_forward_pre_hook(inputs)
        model.backbone.register_forward_hook(outputs)
        result = real(trainer, model, *args, **kwargs)
        seen["precision"] = trainer.precision
        seen["streaming"] = trainer.datamodule.streaming
        return result

    monkeypatch.setattr(L.Trainer, "fit", fit)
    run(image_root, tmp_path / "run", "null", "freeze=false", "trainer.max_epochs=1", *settings)
    assert seen == expected
