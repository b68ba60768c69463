"""Backbones: any torchvision or timm model by name, shipped weights, weights names and files, the
offline errors; and for eleven architectures, everything the trainer does with one."""

import re
import urllib.error
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
import torchvision
from skimage import data as skdata
from torch import nn
from torchvision.transforms.v2 import functional as TF

from src.backbones.__main__ import main
from src.backbones.timm_models import lite0_state_dict, timm_backbone
from src.backbones.torchvision_models import torchvision_backbone
from src.export import export_onnx, run_onnx
from src.frozen.cache import extract
from src.model.inference import chunks, gradcam, target_layer
from src.model.module import TransferModel
from src.model.network import load_model
from src.run.errors import UserError
from src.train import train
from tests.conftest import calibrate_batchnorm, compose_cfg, make_folder, tiny_overrides

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


def test_efficientnet_lite0_backbone_gives_1280_pooled_features_with_its_own_normalisation():
    backbone = timm_backbone("tf_efficientnet_lite0", "imagenet", 64)
    assert backbone.num_features == 1280
    assert backbone.mean == backbone.std == (0.5, 0.5, 0.5)  # timm's pretrained_cfg, TF port
    assert backbone.cam_layer == "blocks.5"
    assert backbone.module.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 1280)


@pytest.mark.parametrize(
    ("make", "name", "size", "stages"),
    [
        (timm_backbone, "tf_efficientnet_lite0", 160, ("blocks.2", "blocks.4", "blocks.6")),
        (torchvision_backbone, "mobilenet_v2", 160, ("features.6", "features.13", "features.18")),
        (torchvision_backbone, "resnet18", 160, ("layer2.1", "layer3.1", "layer4.1")),
        (torchvision_backbone, "mobilenet_v2", 32, ("features.3", "features.6", "features.13")),
        (timm_backbone, "vit_tiny_patch16_224", 224, ()),
    ],
)
def test_stage_layers_end_the_last_three_resolutions(make, name, size, stages):
    backbone = make(name, None, size)
    assert backbone.stage_layers == stages
    if stages:  # each a map of its own size, smaller than the one before (1x1 maps are not)
        modules, sides = dict(backbone.module.named_modules()), []
        handles = [
            modules[n].register_forward_hook(lambda _m, _i, out: sides.append(out.shape[-1]))
            for n in stages
        ]
        backbone.module.eval()(torch.zeros(1, 3, size, size))
        for handle in handles:
            handle.remove()
        assert sides == sorted(set(sides), reverse=True) and sides[-1] > 1


def offline_download(calls: list[str]) -> object:
    """A `load_state_dict_from_url` that fails as on a machine without network, noting the url."""

    def offline(url: str, *args: object, **kwargs: object) -> None:
        calls.append(url)
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    return offline


def test_missing_torchvision_weights_without_network_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    calls: list[str] = []
    # torchvision's Weights.get_state_dict calls its own imported reference, not torch.hub's
    offline = offline_download(calls)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as err:
        torchvision_backbone("mobilenet_v2", "IMAGENET1K_V1")
    assert len(calls) == 1 and calls[0].endswith(".pth")  # the download was asked for, here
    message = str(err.value)
    assert "\n" not in message
    assert "mobilenet_v2 weights IMAGENET1K_V1" in message
    for fix in ("backbone.weights=null", "backbone.weights=/path/", "backbone=efficientnet_lite0"):
        assert fix in message


def test_missing_timm_weights_without_network_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    calls: list[str] = []  # timm's builder holds its own reference too
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_url", offline_download(calls))
    with pytest.raises(UserError) as err:
        timm_backbone("resnet18", "pretrained", 64)
    message = str(err.value)
    assert "\n" not in message and "timm resnet18 pretrained weights" in message
    for fix in ("backbone.weights=null", "backbone.weights=/path/", "backbone=efficientnet_lite0"):
        assert fix in message


def test_unknown_names_and_weights_are_user_errors_that_suggest():
    with pytest.raises(UserError, match="IMAGENET1K_V1"):
        torchvision_backbone("vgg19", "IMAGENET9K")
    with pytest.raises(UserError, match="did you mean resnet50"):
        torchvision_backbone("resnet5O", None)
    with pytest.raises(UserError, match="unknown timm model 'convnext_atoo'.*convnext_atto"):
        timm_backbone("convnext_atoo", None)
    with pytest.raises(UserError, match="no shipped weights for resnet18"):
        timm_backbone("resnet18", "imagenet")


def test_weights_from_a_local_file(tmp_path):
    reference = torchvision.models.mobilenet_v2(weights=None)
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(reference.state_dict(), path)
    backbone = torchvision_backbone("mobilenet_v2", str(path), 32)
    torch.testing.assert_close(
        backbone.module.features.state_dict(), reference.features.state_dict()
    )
    assert backbone.num_features == 1280


def test_missing_or_foreign_weights_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        torchvision_backbone("mobilenet_v2", str(tmp_path / "nope.pth"))
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(UserError, match="same architecture"):
        torchvision_backbone("mobilenet_v2", str(tmp_path / "resnet18.pth"))


def test_a_fixed_size_model_adapts_or_names_the_size():
    vit = torchvision_backbone("vit_b_16", None, 64)  # position embeddings for 4x4 patches
    assert vit.module.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 768)
    with pytest.raises(UserError, match="multiple of its patch size 16.*image_size=64"):
        torchvision_backbone("vit_b_16", None, 70)
    with pytest.raises(UserError, match="maxvit_t cannot take image_size=160.*image_size"):
        torchvision_backbone("maxvit_t", None, 160)


def test_listing_names_matches_with_sizes_and_offline_weights(capsys):
    main(["*efficientnet_lite0"])
    lines = capsys.readouterr().out.splitlines()
    lite0 = next(line for line in lines if line.split()[:2] == ["timm", "tf_efficientnet_lite0"])
    assert lite0.split()[2:5] == ["1280", "3,371,008", "224"]
    assert lite0.split()[-1] == "shipped"
    tv = [line.split() for line in lines if line.startswith("torchvision")]
    assert tv == []  # torchvision has no Lite0
    main(["resnet50"])
    out = capsys.readouterr().out
    assert re.search(r"torchvision +resnet50 +2048 +23,508,032 +224 +0\.485/0\.456/0\.406", out)
    assert re.search(r"timm +resnet50 +2048 ", out)


def classifier_inputs(source: str, name: str) -> int:
    """The input size of the model's own classifier (its first Linear)."""
    if source == "timm":
        return timm.create_model(name).get_classifier().in_features
    model = torchvision.models.get_model(name)
    head = next(
        getattr(model, a) for a in ("fc", "classifier", "heads", "head") if hasattr(model, a)
    )
    return next(m for m in head.modules() if isinstance(m, nn.Linear)).in_features


ARCHITECTURES = [
    ("torchvision", "resnet50", 64),
    ("torchvision", "convnext_tiny", 64),
    ("torchvision", "efficientnet_b0", 64),
    ("torchvision", "mobilenet_v3_large", 64),
    ("torchvision", "densenet121", 64),
    ("torchvision", "regnet_y_400mf", 64),
    ("torchvision", "swin_t", 64),
    ("torchvision", "vit_b_16", 64),
    ("timm", "resnet18", 64),
    ("timm", "convnext_atto", 64),
    ("timm", "vit_tiny_patch16_224", 64),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("arch") / "data", per_class=6, size=64, validation=2)


@pytest.mark.slow
@pytest.mark.parametrize(("source", "name", "size"), ARCHITECTURES)
def test_every_architecture_trains_extracts_explains_and_exports(
    source: str, name: str, size: int, folder: Path, tmp_path: Path, capsys
) -> None:
    overrides = [
        o for o in tiny_overrides(folder) if not o.startswith(("image_size", "trainer.max"))
    ]
    cfg = compose_cfg(
        [*overrides, f"backbone={source}", f"backbone.name={name}", "backbone.weights=null"]
        + [f"image_size={size}", "trainer.max_epochs=1"],
        tmp_path / "run",
    )
    train(cfg)  # frozen, on cached features
    assert re.search(
        rf"^RESULT backbone={name} freeze=True .*test_acc=", capsys.readouterr().out, re.M
    )
    model = load_model(tmp_path / "run/checkpoints/best.ckpt")
    assert model.head.in_features == model.spec.num_features == classifier_inputs(source, name)

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, generator=generator)
    images[2:] //= 4  # darker images: outputs that must differ from the first two's
    calibrate_batchnorm(model.backbone, model.normalise(images))  # features that carry signal
    with torch.inference_mode():
        own = model.features(images)
    assert own.std(0).mean() > 1e-3 * own.abs().mean()  # they change with the input
    cached = extract(model, chunks(images, 2), torch.device("cpu"), bf16=False)
    assert (cached - own).norm() / own.norm() < 1e-4

    heatmaps = gradcam(model, chunks(images, 2), [0, 1, 2, 0], target_layer(model))
    assert heatmaps.shape == (4, size, size)
    assert sum(heatmap.std() > 0 for heatmap in heatmaps) >= 2  # maps, not constants
    assert max(abs(h - heatmaps[0]).max() for h in heatmaps[1:]) > 1e-3  # that change with input

    with torch.inference_mode():
        expected = model(images)
    export_onnx(model, images[:1], tmp_path / "model.onnx")
    got = run_onnx(tmp_path / "model.onnx", images)
    assert expected.std(0).mean() > 1e-4  # the logits depend on the image
    assert (got - expected).abs().max() <= 1e-3 * max(1.0, float(expected.abs().max()))  # export's


@pytest.mark.parametrize(
    ("source", "name", "total"),
    [("torchvision", "resnet50", 23_514_179), ("timm", "resnet18", 11_178_051)],
)
def test_exact_parameter_counts_with_three_classes(source: str, name: str, total: int) -> None:
    backbone = {"_target_": f"src.backbones.{source}_backbone", "name": name, "weights": None}
    model = TransferModel(backbone, ["a", "b", "c"], image_size=64)
    assert sum(p.numel() for p in model.parameters()) == total
