"""Memory format per CPU kind: NCHW against channels_last, for extraction and fine-tune steps.

For each backbone (random weights, 160 px) it times this project's frozen extraction (eval mode,
inference, BatchNorm folded) and its fine-tune step (forward, backward, RMSprop) in both formats,
with the precision `precision=auto` picks on that kind, and prints which format wins beside the
one `src.run.runtime.memory_format` chooses. `--kinds native avx2` also runs the AVX2 kind in a
subprocess restricted with ONEDNN_MAX_CPU_ISA=AVX2 and ATEN_CPU_CAPABILITY=avx2 (an AVX-512
machine then runs the kernels an AVX2-only CPU has). Writes bench/KERNELS.md.

    python bench/kernels.py [--kinds native avx2] [--backbones mobilenet_v2 vgg19 ...]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench import kinds
from bench.train_speed import SIZE, finetune_step, make_model
from src.frozen.cache import fold_batchnorm
from src.run.runtime import (
    bf16_supported,
    cpu_kind,
    keep_freed_memory,
    memory_format,
    normalisation,
)

BACKBONES = {
    "mobilenet_v2": "src.backbones.torchvision_backbone",
    "vgg19": "src.backbones.torchvision_backbone",
    "resnet50": "src.backbones.torchvision_backbone",
    "tf_efficientnet_lite0": "src.backbones.timm_backbone",
    "convnext_tiny": "src.backbones.torchvision_backbone",
}
FORMATS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}


def seconds_per_call(step, calls: int, warmup: int = 1) -> float:
    """Median seconds of `step()` over `calls` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def extract_rate(name: str, fmt: torch.memory_format, bf16: bool, batch: int, calls: int) -> float:
    model = make_model(name, True, BACKBONES[name]).eval()
    model.memory_format = fmt
    x = torch.randint(0, 256, (batch, 3, SIZE, SIZE), dtype=torch.uint8)
    backbone = fold_batchnorm(model.backbone, model.normalise(x[:2]))

    def step() -> None:
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            backbone(model.normalise(x))

    return batch / seconds_per_call(step, calls)


def finetune_rate(name: str, fmt: torch.memory_format, bf16: bool, batch: int, calls: int) -> float:
    model = make_model(name, False, BACKBONES[name])
    model.memory_format = fmt
    return batch / seconds_per_call(finetune_step(model, bf16, batch), calls)


def measure(backbones: list[str], batch: int, calls: int) -> list[dict[str, object]]:
    """One row per backbone and phase, on the kernels this process may use."""
    keep_freed_memory()
    bf16 = bf16_supported("cpu")
    rows = []
    for name in backbones:
        for phase, timed in (("extract", extract_rate), ("fine-tune", finetune_rate)):
            rates = {label: timed(name, fmt, bf16, batch, calls) for label, fmt in FORMATS.items()}
            norm = normalisation(make_model(name, True, BACKBONES[name]).backbone)
            chosen = memory_format(norm, learning=phase == "fine-tune")
            rows.append(
                {
                    "kind": cpu_kind(),
                    "precision": "bf16" if bf16 else "fp32",
                    "backbone": name,
                    "phase": phase,
                    **{f"{label} img/s": rate for label, rate in rates.items()},
                    "faster": max(rates, key=rates.get),
                    "chosen": next(k for k, v in FORMATS.items() if v == chosen),
                    "chosen/best": rates[next(k for k, v in FORMATS.items() if v == chosen)]
                    / max(rates.values()),
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--calls", type=int, default=3, help="timed batches per rate")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "KERNELS.md")
    args, rows = kinds.rows_per_kind(
        parser, "bench.kernels", lambda a: measure(a.backbones, a.batch, a.calls)
    )
    intro = (
        f"torch {torch.__version__}. Batch {args.batch} at {SIZE} px, random weights, median of "
        f"{args.calls} timed batches. `avx2`: the same machine restricted with "
        f"{kinds.RESTRICTION}. `chosen`: what src.run.runtime.memory_format picks; `chosen/best`: "
        "its rate over the faster format's."
    )
    kinds.write_section(args.out, "Memory format per CPU kind", intro, rows)


if __name__ == "__main__":
    main()
