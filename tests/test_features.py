"""The frozen-feature cache: what invalidates it, and that a valid one skips the backbone."""

import os

import pytest
import torch
from torch import nn

import src.frozen.cache
from src.data.module import ImageFolderData
from src.frozen.cache import cache_key, cached_features, fold_batchnorm
from src.model.finetune import batchnorm_layers
from src.model.module import TransferModel
from tests.conftest import calibrate_batchnorm

CPU = torch.device("cpu")

BACKBONE = {
    "_target_": "src.backbones.torchvision_backbone",
    "name": "mobilenet_v2",
    "weights": None,
}


@pytest.fixture
def data(image_root):
    return ImageFolderData(str(image_root), image_size=32, val_fraction=0.25)


def test_key_depends_on_backbone_size_precision_device_format_versions_and_files(
    data, image_root, monkeypatch
):
    key = cache_key(BACKBONE, data, "fp32", CPU)
    assert cache_key(BACKBONE, data, "fp32", CPU) == key
    assert cache_key({**BACKBONE, "name": "vgg19"}, data, "fp32", CPU) != key
    assert cache_key(BACKBONE, data, "bf16", CPU) != key
    assert cache_key(BACKBONE, data, "fp32", torch.device("cuda")) != key
    assert cache_key(BACKBONE, data, "fp32", CPU, torch.contiguous_format) != key
    bigger = ImageFolderData(str(image_root), image_size=48, val_fraction=0.25)
    assert cache_key(BACKBONE, bigger, "fp32", CPU) != key
    for library in ("torchvision", "timm", "pillow"):
        with monkeypatch.context() as patch:
            patch.setattr(src.frozen.cache, "versions", lambda lib=library: {lib: "0.0"})
            assert cache_key(BACKBONE, data, "fp32", CPU) != key
    touched = data.train_split.paths[0]
    os.utime(touched, ns=(1, 1))
    assert cache_key(BACKBONE, data, "fp32", CPU) != key


def test_valid_cache_skips_the_backbone(data, tmp_path, monkeypatch):
    model = TransferModel(BACKBONE, data.classes, 32, freeze=True)
    first = cached_features(model, data, BACKBONE, tmp_path, CPU, bf16=False)
    assert {k: v.shape for k, v in first.items()} == {
        "train": (18, 1280),
        "val": (6, 1280),
        "test": (12, 1280),
    }

    def fail(*args, **kwargs):
        raise AssertionError("the backbone ran although the cache was valid")

    monkeypatch.setattr(src.frozen.cache, "extract", fail)
    again = cached_features(model, data, BACKBONE, tmp_path, CPU, bf16=False)
    for name in first:
        assert torch.equal(first[name], again[name])


def test_cached_features_are_the_models_own(data):
    model = TransferModel(BACKBONE, data.classes, 32, freeze=True)
    data.setup()
    images = data.datasets["val"].images
    calibrate_batchnorm(model.backbone, model.normalise(images))  # features that carry signal
    features = cached_features(model, data, BACKBONE, None, CPU, bf16=False)
    with torch.no_grad():
        own = model.eval().features(images)
    assert own.std(0).mean() > 1e-2 * own.abs().mean()  # they differ between images
    assert (features["val"] - own).norm() / own.norm() < 1e-3  # folded: float32 rounding


def test_stage_features_are_the_stages_pooled_outputs_cached_apart(data, tmp_path):
    model = TransferModel(BACKBONE, data.classes, 32, freeze=True)
    data.setup()
    images = data.datasets["val"].images
    calibrate_batchnorm(model.backbone, model.normalise(images))
    layers = model.spec.stage_layers
    pooled = cached_features(model, data, BACKBONE, tmp_path, CPU, bf16=False)
    staged = cached_features(model, data, BACKBONE, tmp_path, CPU, bf16=False, layers=layers)
    assert len(list(tmp_path.glob("*.pt"))) == 2  # one cache file each
    modules, maps = dict(model.backbone.named_modules()), []
    handles = [
        modules[n].register_forward_hook(lambda _m, _i, out: maps.append(out.mean((2, 3))))
        for n in layers
    ]
    with torch.no_grad():
        model.eval().features(images)
    for handle in handles:
        handle.remove()
    own = torch.cat(maps, 1)
    assert staged["val"].shape == (6, 24 + 32 + 96) != pooled["val"].shape
    assert (staged["val"] - own).norm() / own.norm() < 1e-3
    assert not any(m._forward_hooks for m in model.backbone.modules())  # hooks removed


def non_trivial_batchnorm(module: nn.Module, inputs: torch.Tensor) -> None:
    """Statistics of `inputs` (features that carry signal) and affine weights other than 1/0."""
    calibrate_batchnorm(module, inputs)
    for bn in batchnorm_layers(module):
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)


@pytest.mark.parametrize(
    ("backbone", "norms"),
    [
        (BACKBONE, 52),  # torchvision: Conv2d -> BatchNorm2d in Sequential blocks
        (  # timm: Conv2dSame / Conv2d attributes, BatchNormAct2d with its activation
            {
                "_target_": "src.backbones.timm_backbone",
                "name": "tf_efficientnet_lite0",
                "weights": None,
            },
            49,
        ),
    ],
)
def test_folding_batchnorm_keeps_the_features_and_leaves_the_model_alone(backbone, norms):
    model = TransferModel(backbone, ["a", "b"], 32, freeze=True)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    non_trivial_batchnorm(model.backbone, model.normalise(images))
    folded = fold_batchnorm(model.backbone, model.normalise(images[:2]))
    assert folded is not model.backbone
    assert not batchnorm_layers(folded)
    assert len(batchnorm_layers(model.backbone)) == norms
    with torch.no_grad():
        expected = model.features(images)
        got = folded(model.normalise(images))
    assert expected.std(0).mean() > 1e-2 * expected.abs().mean()  # features differ by image
    assert (got - expected).norm() / expected.norm() < 1e-4


class CallOrder(nn.Module):
    """A BatchNorm registered right after a convolution but applied to the input instead."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x)).mean((2, 3))


def test_folding_that_would_change_the_features_is_not_used():
    model, inputs = CallOrder().eval(), torch.randn(4, 3, 8, 8)
    non_trivial_batchnorm(model.bn, inputs)
    assert fold_batchnorm(model, inputs) is model
