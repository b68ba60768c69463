"""Process-level speed settings: allocator, float32 strided depthwise training (precision:
test_precision.py)."""

import os

import torch
import torch.nn.functional as F
import torchvision

from src import runtime
from src.runtime import (
    StridedDepthwise,
    keep_freed_memory,
    train_strided_depthwise_in_fp32,
)


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
