"""Eager against torch.compile for a full fine-tune on this CPU: the first step (compilation
included) and the steady step, for MobileNetV2 and VGG19 at 160 px, random weights, float32 (the
precision=auto of a CPU without bf16). The figures behind `compile=auto` (src.run.devices).

    python -m bench.compile_cpu [--steps 4]
"""

import argparse
import time

import torch
import torch.nn.functional as F

from src.model.network import TransferNet
from src.run.runtime import cpu_kind, keep_freed_memory

SHAPES = {"mobilenet_v2": 16, "vgg19": 8}  # backbone: batch (kept small: 2 shared cores)
SIZE = 160


def steps(name: str, batch: int, compiled: bool, n: int) -> tuple[float, float]:
    """Seconds of the first training step and the mean of the next `n`."""
    torch.manual_seed(0)
    backbone = {"_target_": "src.backbones.torchvision_backbone", "name": name, "weights": None}
    model = TransferNet(backbone, ["a", "b"], SIZE).train()
    if compiled:
        model.backbone.compile()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    images = torch.randint(0, 256, (batch, 3, SIZE, SIZE), dtype=torch.uint8)
    labels = torch.randint(0, 2, (batch,))

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n):
        step()
    return first, (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    keep_freed_memory()
    print(f"CPU kind {cpu_kind()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(
        "| backbone | batch | eager first s | eager step s | compiled first s | "
        "compiled step s | steps to break even |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, batch in SHAPES.items():
        e_first, e_step = steps(name, batch, False, args.steps)
        c_first, c_step = steps(name, batch, True, args.steps)
        gain = e_step - c_step
        even = f"{(c_first - e_first) / gain:.0f}" if gain > 0 else "never"
        print(
            f"| {name} | {batch} | {e_first:.2f} | {e_step:.3f} | {c_first:.1f} | "
            f"{c_step:.3f} | {even} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
