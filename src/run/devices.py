"""Where a run computes, decided before the Trainer starts and without initialising CUDA: the
accelerator, the strategy for several GPUs, determinism and whether to compile. CUDA stays
uninitialised (GPUs are counted through NVML, as Lightning counts them): a forked rank
(ddp_fork, ddp_notebook, a notebook) cannot use CUDA initialised in its parent.
"""

import os
from typing import Any

from lightning.fabric.accelerators.cuda import num_cuda_devices
from omegaconf import DictConfig

from src.run.runtime import cpu_kind, gpu_capability

# Launchers that start every rank themselves: Lightning's `ddp` then re-runs nothing
CLUSTER_ENV = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")
# Measured compile gains, by device kind: a kind absent here stays eager under compile=auto
# (bench/compile_cpu.py on AVX2 Zen 3: compiling costs more than any short run saves; GPUs: to
# be filled from bench/gpu.py's eager-against-compiled rows)
COMPILE_WINS: dict[str, int] = {}  # device kind -> training steps from which compiling pays


def accelerator(cfg: DictConfig) -> str:
    """`gpu` or `cpu`: what the Trainer's accelerator setting resolves to here."""
    wanted = str(cfg.trainer.get("accelerator", "auto"))
    if wanted in {"gpu", "cuda"} or (wanted == "auto" and num_cuda_devices() > 0):
        return "gpu"
    return "cpu"


def device_count(devices: Any, available: int) -> int:
    """How many devices `trainer.devices` asks for: auto or -1 all, a count, a list of indices
    or a comma-separated string of them."""
    if devices in ("auto", -1, "-1", None):
        return available
    if isinstance(devices, int):
        return devices
    if isinstance(devices, str):
        return available if devices.strip() == "-1" else len([d for d in devices.split(",") if d])
    return len(list(devices))


def launched_by_cluster() -> bool:
    """Whether torchrun or srun started this process as one of several ranks."""
    if any(name in os.environ for name in CLUSTER_ENV):
        return True
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1


def strategy(cfg: DictConfig, kind: str) -> str:
    """The Trainer's strategy: the configured one, except that `auto` on several GPUs becomes
    `ddp_spawn`, whose ranks get the job in memory. Lightning's own choice there, `ddp`,
    re-runs the command line per rank: a `-m` sweep or a joblib job would start again in each,
    every rank would rescan and extract. Under torchrun or srun the ranks exist already."""
    chosen = str(cfg.trainer.get("strategy", "auto"))
    if chosen != "auto" or kind != "gpu" or launched_by_cluster():
        return chosen
    gpus = device_count(cfg.trainer.get("devices", "auto"), num_cuda_devices())
    return "ddp_spawn" if gpus > 1 else chosen


def deterministic(value: Any, kind: str) -> bool | str:
    """`trainer.deterministic`: `auto` is true on a CPU (same numbers run after run, at no cost
    measured) and false on a GPU, where deterministic kernels cost 10-40% for convnets, disable
    cuDNN's autotuning and raise in the backward of max-pooling and interpolation."""
    if value == "auto":
        return kind == "cpu"
    return value


def trainer_settings(cfg: DictConfig) -> dict[str, Any]:
    """Trainer arguments resolved for this machine: strategy, determinism, cuDNN autotuning
    (on where determinism is off and the config leaves `benchmark` unset)."""
    kind = accelerator(cfg)
    exact = deterministic(cfg.trainer.get("deterministic", "auto"), kind)
    settings: dict[str, Any] = {"strategy": strategy(cfg, kind), "deterministic": exact}
    if kind == "gpu" and exact is False and cfg.trainer.get("benchmark") is None:
        settings["benchmark"] = True
    return settings


def device_kind(kind: str) -> str:
    """The kind of device compilation was measured on: `cuda-sm<major><minor>` or the CPU's
    kernel class (src.run.runtime.cpu_kind)."""
    if kind == "gpu":
        return "cuda-sm{}{}".format(*gpu_capability())
    return cpu_kind()


def compile_backbone(value: Any, kind: str, steps: int) -> bool:
    """`compile`: true or false as set; `auto` compiles only where measurements on this kind of
    device (COMPILE_WINS) show it repaying its compilation within the run's `steps`."""
    if value != "auto":
        return bool(value)
    from_steps = COMPILE_WINS.get(device_kind(kind))
    return from_steps is not None and steps >= from_steps
