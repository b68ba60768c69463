"""Process-level speed settings: memory allocator, numeric precision."""

import ctypes
import ctypes.util
import sys

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's upper bound on 64-bit


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory instead of returning it to the OS.

    With the defaults, every large activation freed in a training step is unmapped and faulted in
    again on the next (200-280k page faults per MobileNetV2 step). Returns whether it applied.
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
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    )


def bf16_supported(accelerator: str) -> bool:
    """Whether bf16 autocast runs fast on this accelerator (native bf16 units)."""
    if accelerator == "gpu":
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_precision(precision: str, accelerator: str) -> str:
    """Lightning precision for `precision` (`auto`: bf16-mixed where native, else 32-true)."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if bf16_supported(accelerator) else "32-true"
