"""Process-level speed settings: allocator, float32 strided depthwise training (precision:
test_precision.py)."""

import os

import pytest
import torch
import torch.nn.functional as F
import torchvision

from src.model.module import TransferModel
from src.run import runtime
from src.run.runtime import (
    StridedDepthwise,
    keep_freed_memory,
    memory_format,
    normalisation,
    train_strided_depthwise_in_fp32,
)
from tests.test_finetune import build, tiny


def test_allocator_setting_applies_on_glibc_linux():
    assert keep_freed_memory()


def test_strided_depthwise_convolutions_train_in_float32_under_cpu_bf16():
    backbone = torchvision.models.mobilenet_v2().features
    keys = list(backbone.state_dict())
    assert train_strided_depthwise_in_fp32(backbone) == 4
    assert list(backbone.state_dict()) == keys
    layer = next(m for m in backbone.modules() if isinstance(m, StridedDepthwise))
    x = torch.randn(2, layer.in_channels, 16, 16).bfloat16()
    args = (None, layer.stride, layer.padding, layer.dilation, layer.groups)
    in_fp32 = F.conv2d(x.float(), layer.weight, *args).bfloat16()
    in_bf16 = F.conv2d(x, layer.weight.bfloat16(), *args)
    assert not torch.equal(in_fp32, in_bf16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer(x), in_fp32)  # training: float32
        with torch.no_grad():
            assert torch.equal(layer(x), in_bf16)  # inference: the bf16 kernel


def test_timm_same_padding_convolutions_keep_their_padding_and_pickle():
    import pickle

    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    x = torch.randn(1, 3, 33, 33)  # an odd size: 'same' padding differs from a fixed one
    with torch.no_grad():
        before = model(x)
    assert train_strided_depthwise_in_fp32(model) == 4
    layer = next(m for m in model.modules() if isinstance(m, StridedDepthwise))
    assert type(layer).__mro__[2].__name__ == "Conv2dSame"
    with torch.no_grad():
        assert torch.equal(model(x), before)
        copy = pickle.loads(pickle.dumps(model))  # as ddp_spawn sends the model to its ranks
        assert type(next(m for m in copy.modules() if isinstance(m, StridedDepthwise))) is type(
            layer
        )
        assert torch.equal(copy(x), before)


def test_nvml_check_is_dropped_only_where_nvml_cannot_load(monkeypatch) -> None:
    monkeypatch.setenv(runtime.NVML_CHECK, "1")

    def missing(name: str) -> None:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(runtime.ctypes, "CDLL", missing)
    assert runtime.drop_failing_nvml_check()
    assert runtime.NVML_CHECK not in os.environ
    assert not runtime.drop_failing_nvml_check()  # nothing left to drop

    monkeypatch.setenv(runtime.NVML_CHECK, "1")
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: object())  # a driver is there
    assert not runtime.drop_failing_nvml_check()
    assert os.environ[runtime.NVML_CHECK] == "1"


AVX2_RULE = {  # (normalisation, learning) -> the format measured faster with AVX2 kernels
    ("batchnorm", False): torch.channels_last,  # ResNet-50, MobileNetV2, EfficientNet-Lite0
    ("batchnorm", True): torch.channels_last,
    ("layernorm", False): torch.contiguous_format,  # ConvNeXt
    ("layernorm", True): torch.contiguous_format,
    ("none", False): torch.channels_last,  # VGG19 extraction
    ("none", True): torch.contiguous_format,  # VGG19 fine-tune
}


@pytest.mark.parametrize(
    ("capability", "variables", "avx2"),
    [
        ("AVX2", {}, True),  # Zen 1, Haswell
        ("AVX512", {"ONEDNN_MAX_CPU_ISA": "AVX2"}, True),
        ("AVX512", {}, False),
        ("DEFAULT", {}, False),  # ARM: channels_last as before
    ],
)
def test_memory_format_follows_the_cpu_kind_and_the_backbone(
    capability, variables, avx2, monkeypatch
) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    for (norm, learning), expected in AVX2_RULE.items():
        assert memory_format(norm, learning) == (expected if avx2 else torch.channels_last)
        assert memory_format(norm, learning, "cuda") == torch.channels_last


def test_backbones_are_told_by_their_normalisation() -> None:
    assert normalisation(torchvision.models.mobilenet_v2().features) == "batchnorm"
    assert normalisation(torchvision.models.resnet18()) == "batchnorm"
    assert normalisation(torchvision.models.convnext_tiny().features) == "layernorm"
    assert normalisation(torchvision.models.vgg11().features) == "none"


def test_model_input_takes_the_chosen_or_the_set_memory_format(monkeypatch) -> None:
    """VGG with AVX2 kernels: NCHW while it learns, channels_last for inference."""
    backbone = {"_target_": "src.backbones.torchvision_backbone", "name": "vgg11", "weights": None}
    model = TransferModel(backbone, ["a", "b"], image_size=32, freeze=False)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    last = torch.channels_last
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert model.normalise(images).is_contiguous()
    assert not model.normalise(images).is_contiguous(memory_format=last)
    with torch.no_grad():
        assert model.normalise(images).is_contiguous(memory_format=last)
    model.memory_format = last
    assert model.normalise(images).is_contiguous(memory_format=last)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    model.memory_format = None
    assert model.normalise(images).is_contiguous(memory_format=last)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("auto", None),
        ("contiguous", torch.contiguous_format),
        ("channels_last", torch.channels_last),
    ],
)
def test_memory_format_override_reaches_the_model(image_root, tmp_path, value, expected) -> None:
    cfg = tiny(image_root, tmp_path, f"memory_format={value}")
    model, _ = build(cfg)
    assert model.memory_format == expected
