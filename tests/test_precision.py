"""precision=auto picks bf16-mixed only where the hardware computes bf16 natively."""

from pathlib import Path

import pytest
import torch

import src.run.runtime
from src.run.runtime import cpu_flags, resolve_precision

X86 = "fpu sse4_2 avx avx2 fma bmi2"
AVX512 = f"{X86} avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni"
CPUS = {  # name -> (the flags /proc/cpuinfo lists, what precision=auto resolves to)
    "skylake": (AVX512, "32-true"),  # AVX-512BW (mkldnn's bf16 check) but no bf16
    "cooper_lake": (f"{AVX512} avx512_bf16", "bf16-mixed"),
    "zen4": (f"{AVX512} avx512_bf16 avx512_vbmi2", "bf16-mixed"),
    "sapphire_rapids": (f"{AVX512} avx512_bf16 amx_bf16 amx_tile amx_int8", "bf16-mixed"),
    "amx_only": (f"{AVX512} amx_bf16 amx_tile", "bf16-mixed"),  # a VM hiding AVX512_BF16
    "zen1": (X86, "32-true"),
}
GPUS = {  # name -> (compute capability, what precision=auto resolves to)
    "t4": ((7, 5), "32-true"),
    "v100": ((7, 0), "32-true"),
    "a100": ((8, 0), "bf16-mixed"),
    "h100": ((9, 0), "bf16-mixed"),
}


def cpuinfo(flags: str) -> str:
    """/proc/cpuinfo of a 2-core x86 machine with `flags`."""
    return "".join(
        f"processor\t: {i}\nvendor_id\t: GenuineIntel\nflags\t\t: {flags}\nbogomips\t: 4000\n\n"
        for i in range(2)
    )


@pytest.mark.parametrize("cpu", list(CPUS))
def test_cpu_bf16_only_with_bf16_instructions(
    cpu: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flags, expected = CPUS[cpu]
    (tmp_path / "cpuinfo").write_text(cpuinfo(flags))
    monkeypatch.setattr(src.run.runtime, "CPUINFO", tmp_path / "cpuinfo")
    assert cpu_flags() == set(flags.split())
    assert resolve_precision("auto", "cpu") == expected


@pytest.mark.parametrize(
    "text",
    [
        None,  # macOS, Windows: no /proc/cpuinfo
        "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\nCPU implementer\t: 0x41\n",  # ARM Linux
    ],
)
def test_cpu_without_x86_flags_is_not_native(
    text: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if text is not None:
        (tmp_path / "cpuinfo").write_text(text)
    monkeypatch.setattr(src.run.runtime, "CPUINFO", tmp_path / "cpuinfo")
    assert cpu_flags() == set()
    assert resolve_precision("auto", "cpu") == "32-true"


@pytest.mark.parametrize("gpu", list(GPUS))
def test_gpu_bf16_only_from_compute_capability_8(gpu: str, monkeypatch: pytest.MonkeyPatch):
    capability, expected = GPUS[gpu]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation too
    assert resolve_precision("auto", "gpu") == expected


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed", "64-true"])
@pytest.mark.parametrize("accelerator", ["cpu", "gpu"])
def test_explicit_precision_passes_through(
    precision: str, accelerator: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_detection(*args: object) -> None:
        raise AssertionError("an explicit precision needs no hardware detection")

    monkeypatch.setattr(src.run.runtime, "bf16_supported", no_detection)
    assert resolve_precision(precision, accelerator) == precision


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}, "32-true"),
        ({"ONEDNN_MAX_CPU_ISA": "avx512_core_vnni"}, "32-true"),  # AVX-512 without bf16
        ({"DNNL_MAX_CPU_ISA": "AVX2"}, "32-true"),  # oneDNN's older name
        ({"ATEN_CPU_CAPABILITY": "default"}, "32-true"),
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, "bf16-mixed"),
        ({"ONEDNN_MAX_CPU_ISA": "ALL"}, "bf16-mixed"),
    ],
)
def test_kernels_restricted_below_bf16_run_float32(
    variables: dict[str, str], expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Zen 4 told to use AVX2 kernels imitates an AVX2 CPU, which has no native bf16."""
    (tmp_path / "cpuinfo").write_text(cpuinfo(CPUS["zen4"][0]))
    monkeypatch.setattr(src.run.runtime, "CPUINFO", tmp_path / "cpuinfo")
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert resolve_precision("auto", "cpu") == expected
