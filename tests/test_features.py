"""The frozen-feature cache: what invalidates it, and that a valid one skips the backbone."""

import os

import pytest
import torch
from torch import nn

import src.features
from src.data import ImageFolderData
from src.features import cache_key, cached_features, fold_batchnorm
from src.finetune import batchnorm_layers
from src.model import TransferModel

BACKBONE = {
    "_target_": "src.backbones.torchvision_backbone",
    "name": "mobilenet_v2",
    "weights": None,
}


@pytest.fixture
def data(image_root):
    return ImageFolderData(str(image_root), image_size=32, val_fraction=0.25)


def test_key_depends_on_backbone_size_precision_and_files(data, image_root):
    key = cache_key(BACKBONE, data, "fp32")
    assert cache_key(BACKBONE, data, "fp32") == key
    assert cache_key({**BACKBONE, "name": "vgg19"}, data, "fp32") != key
    assert cache_key(BACKBONE, data, "bf16") != key
    bigger = ImageFolderData(str(image_root), image_size=48, val_fraction=0.25)
    assert cache_key(BACKBONE, bigger, "fp32") != key
    touched = data.train_split.paths[0]
    os.utime(touched, ns=(1, 1))
    assert cache_key(BACKBONE, data, "fp32") != key


def test_valid_cache_skips_the_backbone(data, tmp_path, monkeypatch):
    model = TransferModel(BACKBONE, data.classes, 32, freeze=True)
    first = cached_features(model, data, BACKBONE, tmp_path, torch.device("cpu"), bf16=False)
    assert {k: v.shape for k, v in first.items()} == {
        "train": (18, 1280),
        "val": (6, 1280),
        "test": (12, 1280),
    }

    def fail(*args, **kwargs):
        raise AssertionError("the backbone ran although the cache was valid")

    monkeypatch.setattr(src.features, "extract", fail)
    again = cached_features(model, data, BACKBONE, tmp_path, torch.device("cpu"), bf16=False)
    for name in first:
        assert torch.equal(first[name], again[name])


def test_features_match_the_model(data):
    model = TransferModel(BACKBONE, data.classes, 32, freeze=True)
    features = cached_features(model, data, BACKBONE, None, torch.device("cpu"), bf16=False)
    data.setup()
    images = data.datasets["val"].images
    with torch.no_grad():
        torch.testing.assert_close(features["val"], model.eval().features(images))


def test_folding_batchnorm_keeps_the_features_and_leaves_the_model_alone():
    model = TransferModel(BACKBONE, ["a", "b"], 32, freeze=True)
    for bn in batchnorm_layers(model.backbone):  # statistics other than the identity 0/1
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    folded = fold_batchnorm(model.backbone)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert len(batchnorm_layers(model.backbone)) == 52
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        expected = model.features(images)
        got = model.pool(folded(model.normalise(images)))
    assert expected.abs().max() > 1e-3  # a real signal, not the vanishing one of random BN
    assert (got - expected).norm() / expected.norm() < 1e-5
