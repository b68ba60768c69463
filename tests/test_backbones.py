"""Backbones: shipped offline weights, torchvision weights names and files, the offline error."""

import urllib.error

import pytest
import timm
import torch
import torchvision
from skimage import data as skdata
from torchvision.transforms.v2 import functional as TF

from src.backbones import lite0_state_dict, timm_backbone, torchvision_backbone
from src.errors import UserError

ESPRESSO = 967  # ImageNet-1k class index


def test_shipped_efficientnet_lite0_weights_recognise_an_espresso():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(lite0_state_dict())
    image = TF.resize(torch.from_numpy(skdata.coffee()).permute(2, 0, 1), [224, 224])
    x = TF.normalize(image.float()[None] / 255, [0.5] * 3, [0.5] * 3)
    with torch.no_grad():
        probabilities = model.eval()(x).softmax(1)[0]
    assert probabilities.argmax().item() == ESPRESSO
    assert probabilities[ESPRESSO] > 0.8


def test_efficientnet_lite0_backbone_gives_1280_feature_maps():
    backbone = timm_backbone("efficientnet_lite0", "imagenet")
    assert backbone.num_features == 1280
    assert backbone.mean == backbone.std == (0.5, 0.5, 0.5)
    assert backbone.features.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 1280, 2, 2)


def test_missing_weights_without_network_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as err:
        torchvision_backbone("mobilenet_v2", "IMAGENET1K_V1")
    message = str(err.value)
    assert "\n" not in message
    assert "mobilenet_v2 weights IMAGENET1K_V1" in message
    for fix in ("backbone.weights=null", "backbone.weights=/path/", "backbone=efficientnet_lite0"):
        assert fix in message


def test_unknown_weights_name_lists_the_valid_ones():
    with pytest.raises(UserError, match="IMAGENET1K_V1"):
        torchvision_backbone("vgg19", "IMAGENET9K")


def test_weights_from_a_local_file(tmp_path):
    reference = torchvision.models.mobilenet_v2(weights=None)
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(reference.state_dict(), path)
    backbone = torchvision_backbone("mobilenet_v2", str(path))
    torch.testing.assert_close(backbone.features.state_dict(), reference.features.state_dict())
    assert backbone.num_features == 1280


def test_missing_weights_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        torchvision_backbone("mobilenet_v2", str(tmp_path / "nope.pth"))
