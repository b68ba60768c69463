"""Parameter counts and the meaning of a frozen backbone."""

from functools import partial

import pytest
import torch
from torch import nn

from src.model.module import TransferModel, freeze, parameter_summary, trainable_parameters
from tests.conftest import calibrate_batchnorm

CLASSES = [f"c{i}" for i in range(6)]
SEEDED = torch.Generator().manual_seed(0)


def make(name: str, frozen: bool) -> TransferModel:
    backbone = {"_target_": "src.backbones.torchvision_backbone", "name": name, "weights": None}
    return TransferModel(
        backbone, CLASSES, freeze=frozen, optimizer=partial(torch.optim.RMSprop, lr=1e-4)
    )


@pytest.mark.parametrize(
    ("name", "frozen", "total", "trainable"),
    [
        ("mobilenet_v2", True, 2_231_558, 7_686),
        ("mobilenet_v2", False, 2_231_558, 2_231_558),
        ("vgg19", True, 20_027_462, 3_078),
        ("vgg19", False, 20_027_462, 20_027_462),
    ],
)
def test_parameter_counts_match_the_published_ones(name, frozen, total, trainable):
    model = make(name, frozen)
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for p in trainable_parameters(model)) == trainable
    assert parameter_summary(model).splitlines() == [
        f"Total params: {total:,}",
        f"Trainable params: {trainable:,}",
        f"Non-trainable params: {total - trainable:,}",
    ]


def test_freeze_stops_gradients_and_sets_eval_mode():
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout())
    freeze(module)
    assert all(not p.requires_grad for p in module.parameters())
    assert not module.training and not module[1].training and not module[2].training


def test_frozen_backbone_stays_in_eval_mode_when_the_trainer_calls_train():
    model = make("mobilenet_v2", frozen=True)
    model.train()
    assert model.training and model.head.training
    batchnorms = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert batchnorms and not any(m.training for m in batchnorms)
    assert not any(m.training for m in model.backbone.modules())


def test_unfrozen_backbone_trains():
    model = make("mobilenet_v2", frozen=False).train()
    assert all(m.training for m in model.backbone.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_only_head_parameters_reach_the_optimizer_when_frozen():
    model = make("mobilenet_v2", frozen=True)
    optimizer = model.configure_optimizers()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(optimizer.param_groups) == 1
    assert {id(p) for p in params} == {id(model.head.weight), id(model.head.bias)}
    assert optimizer.param_groups[0]["lr"] == 1e-4


def test_all_parameters_reach_the_optimizer_when_unfrozen():
    model = make("mobilenet_v2", frozen=False)
    params = [p for g in model.configure_optimizers().param_groups for p in g["params"]]
    assert len(params) == len(list(model.parameters()))


def test_forward_takes_uint8_images():
    """uint8 images in, logits out, through ImageNet normalisation and a backbone calibrated on
    them (a random one in eval mode gives the head's bias whatever the image)."""
    model = make("mobilenet_v2", frozen=True).eval()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=SEEDED)
    mean = 255 * torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = 255 * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    normalised = (images.float() - mean) / std  # ImageNet's statistics, on the 0-255 scale
    calibrate_batchnorm(model.backbone, normalised)
    with torch.no_grad():
        logits = model(images)
        from_features = model.head(model.features(images))
        from_floats = model(images.float())
        by_hand = model.head(model.backbone(normalised))
    assert logits.shape == (4, 6)
    torch.testing.assert_close(logits, from_features)
    torch.testing.assert_close(logits, from_floats)
    torch.testing.assert_close(logits, by_hand, atol=5e-4, rtol=1e-3)  # memory formats differ
    assert torch.cdist(logits, logits).add(torch.eye(4)).min() > 1e-3  # each image its own


class Untouchable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the backbone ran on cached features")


def test_a_step_on_cached_features_runs_the_head_alone():
    model = make("mobilenet_v2", frozen=True)
    model.backbone = Untouchable()
    features, labels = torch.randn(4, 1280), torch.tensor([0, 1, 2, 3])
    loss = model.training_step((features, labels))
    expected = torch.nn.functional.cross_entropy(model.head(features), labels)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
