"""The frozen-feature cache: what invalidates it, and that a valid one skips the backbone."""

import os

import pytest
import torch

import src.features
from src.data import ImageFolderData
from src.features import cache_key, cached_features
from src.model import TransferModel
from src.runtime import bf16_supported, keep_freed_memory, resolve_precision

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


def test_precision_auto_follows_the_hardware():
    assert resolve_precision("32-true", "cpu") == "32-true"
    expected = "bf16-mixed" if bf16_supported("cpu") else "32-true"
    assert resolve_precision("auto", "cpu") == expected


def test_allocator_setting_applies_on_glibc_linux():
    assert keep_freed_memory()
