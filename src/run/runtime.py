"""Process-level speed settings: memory allocator, numeric precision."""

import ctypes
import ctypes.util
import functools
import logging
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's upper bound on 64-bit
CPUINFO = Path("/proc/cpuinfo")
NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"
BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16"}  # x86 instructions that compute in bf16
BF16_GPU_CAPABILITY = (8, 0)  # CUDA compute capability with bf16 tensor cores (A100 on)
ONEDNN_ISA = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")  # oneDNN's kernel restriction variables
# ONEDNN_MAX_CPU_ISA values whose kernels have no bf16 dot products, and those without AVX-512
ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                     "AVX512_CORE_VNNI"}  # fmt: skip
ISAS_WITHOUT_AVX512 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2"}
# What `precision` may be: auto, or one of Lightning's (16 and bf16 "-true" hold the weights in
# that dtype; "-mixed" autocasts float32 weights)
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory instead of returning it to the OS.

    With the defaults, every large activation freed in a training step is unmapped and faulted in
    again on the next (200-280k page faults per MobileNetV2 step). Buffers above the largest
    mmap threshold glibc allows (32 MiB; VGG19's activations reach 200 MiB) are kept off mmap
    too: measured here, +27% MobileNetV2 and +12% VGG19 extraction. Returns whether it applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
        and mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
        and mallopt(M_MMAP_MAX, 0)
    )


def drop_failing_nvml_check() -> bool:
    """Unset PYTORCH_NVML_BASED_CUDA_CHECK where NVML cannot be loaded (no NVIDIA driver).

    Lightning sets it at import, so that CUDA checks do not initialise CUDA before a fork. Every
    optimizer step checks for CUDA (torch's graph-capture health check), and with the variable
    set each check tries to dlopen NVML again, then falls back to the plain count, which is all
    an unset variable does: on a CPU machine this doubled a linear head's step. Returns whether
    it was unset.
    """
    if os.environ.get(NVML_CHECK) != "1":
        return False
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        del os.environ[NVML_CHECK]
        return True
    return False


def cpu_flags() -> set[str]:
    """The x86 CPU's feature flags, from the `flags` line of /proc/cpuinfo (Linux).

    Empty where there is no such line: macOS and Windows (no /proc/cpuinfo) and ARM Linux
    (which lists `Features` instead).
    """
    try:
        lines = CPUINFO.read_text().splitlines()
    except OSError:
        return set()
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def onednn_isa_limit() -> str | None:
    """oneDNN's kernel restriction (ONEDNN_MAX_CPU_ISA, upper case), or None when unrestricted."""
    for name in ONEDNN_ISA:
        value = os.environ.get(name, "").strip().upper()
        if value and value not in ("ALL", "DEFAULT"):
            return value
    return None


def bf16_kernels_restricted() -> bool:
    """Whether ATEN_CPU_CAPABILITY or ONEDNN_MAX_CPU_ISA keep the kernels below bf16 ones, as
    when an AVX-512 bf16 machine imitates an AVX2 CPU."""
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    return aten in ("default", "avx2") or onednn_isa_limit() in ISAS_WITHOUT_BF16


def avx2_kernels() -> bool:
    """Whether this process's x86 kernels are AVX2 ones: the CPU has no AVX-512, or
    ATEN_CPU_CAPABILITY or ONEDNN_MAX_CPU_ISA restricts them to AVX2."""
    aten = torch.backends.cpu.get_cpu_capability()
    return aten == "AVX2" or (aten == "AVX512" and onednn_isa_limit() in ISAS_WITHOUT_AVX512)


def cpu_kind() -> str:
    """The class of CPU kernels this process runs: avx512_bf16, avx512, avx2 or the ATen
    capability (DEFAULT, SVE256...) elsewhere."""
    if bf16_supported("cpu"):
        return "avx512_bf16"
    return "avx2" if avx2_kernels() else torch.backends.cpu.get_cpu_capability().lower()


def bf16_supported(accelerator: str) -> bool:
    """Whether `accelerator` (`gpu` or `cpu`) computes bf16 natively, so bf16 autocast is fast.

    GPU: compute capability 8.0 or more (A100, H100, RTX 30xx on) of the current CUDA device
    (the first unless set: every DDP rank decides before the Trainer picks its device, so all
    agree); not torch.cuda.is_bf16_supported(), which is also true where bf16 is only emulated
    (T4, V100), without its speed. CPU: bf16 instructions (AVX512_BF16: Cooper Lake, Zen 4 on;
    AMX-BF16: Sapphire Rapids on); not mkldnn's check, which only needs AVX-512BW and so takes
    Skylake, where oneDNN converts bf16 to float32 for each op; and not where the kernels are
    restricted below them. Other CPUs (Apple silicon, ARM, any without /proc/cpuinfo) count as
    not native: `precision=bf16-mixed` asks for bf16 there.
    """
    if accelerator == "gpu":
        return gpu_capability() >= BF16_GPU_CAPABILITY
    return bool(cpu_flags() & BF16_CPU_FLAGS) and not bf16_kernels_restricted()


def normalisation(module: nn.Module) -> str:
    """How `module` normalises: `batchnorm` (ResNet, MobileNet, EfficientNet), `layernorm`
    (ConvNeXt, transformers) or `none` (VGG)."""
    layers = list(module.modules())
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in layers):
        return "batchnorm"
    if any(isinstance(m, nn.LayerNorm) for m in layers):
        return "layernorm"
    return "none"


def memory_format(norm: str, learning: bool, device_type: str = "cpu") -> torch.memory_format:
    """The faster memory format for a backbone's input, as measured per CPU kind
    (bench/KERNELS.md, on ResNet-50, MobileNetV2, EfficientNet-Lite0, VGG19 and ConvNeXt).

    channels_last on GPUs and AVX-512 CPUs, and for BatchNorm convnets everywhere. With AVX2
    kernels NCHW is as fast or faster for a LayerNorm backbone (ConvNeXt: level to +13%) and
    faster for a backbone without normalisation while it learns (VGG19 fine-tune +11-23%; its
    extraction stays channels_last, +11-18%).
    """
    if device_type != "cpu" or norm == "batchnorm" or not avx2_kernels():
        return torch.channels_last
    if norm == "layernorm" or learning:
        return torch.contiguous_format
    return torch.channels_last


class StridedDepthwise:
    """A strided depthwise convolution that trains in float32 under CPU bf16 autocast.

    A mixin over the layer's own class (nn.Conv2d, timm's Conv2dSame...). oneDNN (3.12,
    AVX-512 bf16) has no fast bf16 kernel for this layer's backward pass: in a MobileNetV2 step at
    batch 32, its 4 such layers took 170 of 450 ms in bf16 and 35 ms in float32 (71 -> 108
    img/s). Inference and other devices use the plain bf16 path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        training = torch.is_grad_enabled() and self.weight.requires_grad
        if training and x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float()).to(x.dtype)
        return super().forward(x)

    def __reduce_ex__(self, protocol: int) -> tuple:
        """Pickle (ddp_spawn, deepcopy) by the layer's own class: this one is made at run time."""
        return _strided_depthwise, (type(self).__mro__[2], self.__dict__)


@functools.cache
def strided_depthwise_class(base: type[nn.Conv2d]) -> type[nn.Conv2d]:
    """`base` with StridedDepthwise's forward."""
    return type(f"StridedDepthwise{base.__name__}", (StridedDepthwise, base), {})


def _strided_depthwise(base: type[nn.Conv2d], state: dict) -> nn.Conv2d:
    layer = strided_depthwise_class(base).__new__(strided_depthwise_class(base))
    layer.__setstate__(state)
    return layer


def train_strided_depthwise_in_fp32(module: nn.Module) -> int:
    """Give `module`'s strided depthwise convolutions StridedDepthwise's forward; returns how many.

    Only the class changes: parameters and state-dict keys stay the same, and so do outputs
    except for the rounding of CPU bf16 training.
    """
    layers = [
        m
        for m in module.modules()
        if isinstance(m, nn.Conv2d)
        and not isinstance(m, StridedDepthwise)
        and m.groups == m.in_channels > 1
        and m.stride != (1, 1)
    ]
    for layer in layers:
        layer.__class__ = strided_depthwise_class(type(layer))
    return len(layers)


def nvml_capability() -> tuple[int, int] | None:
    """The first visible GPU's compute capability read through NVML (no CUDA context), or None
    where NVML or the device cannot be read."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    if nvml.nvmlInit_v2() != 0:
        return None
    try:
        handle = ctypes.c_void_p()
        first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
        if first.isdigit():
            found = nvml.nvmlDeviceGetHandleByIndex_v2(int(first), ctypes.byref(handle))
        else:  # GPU-<uuid> or MIG-<uuid>
            found = nvml.nvmlDeviceGetHandleByUUID(first.encode(), ctypes.byref(handle))
        major, minor = ctypes.c_int(), ctypes.c_int()
        if found != 0 or nvml.nvmlDeviceGetCudaComputeCapability(
            handle, ctypes.byref(major), ctypes.byref(minor)
        ):
            return None
        return major.value, minor.value
    finally:
        nvml.nvmlShutdown()


def gpu_capability() -> tuple[int, int]:
    """The current GPU's compute capability: torch's once CUDA is initialised, else NVML's,
    and torch's (which initialises CUDA) only where NVML cannot tell."""
    if not torch.cuda.is_initialized():
        capability = nvml_capability()
        if capability is not None:
            return capability
    return torch.cuda.get_device_capability()


def resolve_precision(precision: str, accelerator: str) -> str:
    """Lightning precision for `precision` (`auto`: bf16-mixed where native, else 32-true)."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if bf16_supported(accelerator) else "32-true"


class _DropLines(logging.Filter):
    """Drops log records that start with one of `prefixes`."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_lightning() -> None:
    """Silence Lightning's messages that say nothing about this program's runs."""
    for pattern in (
        r".*module\(s\) in eval mode",  # a frozen backbone is in eval mode by design
        r".*multiple `ModelCheckpoint` callbacks",  # the first one is the best-by-val/acc one
        r".*isinstance\(treespec, LeafSpec\)",
        r".*does not have many workers",  # images are in memory: workers would only add copies
        r".*smaller than the logging interval",
    ):
        warnings.filterwarnings("ignore", pattern)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropLines("💡 Tip"))
