"""Frozen extraction speed of the architectures the tests cover: feature size, parameters and
images per second of this project's extraction (eval, inference mode, BatchNorm folded, bf16
autocast where the CPU has native bf16), random weights, at 160 px (224 for ViT and Swin).

    python bench/backbones.py [--images 96] [--batch 32]

Prints a markdown table and the CPU it ran on.
"""

import argparse
import time

import torch

from src.frozen.cache import extract
from src.model.inference import chunks
from src.model.module import TransferModel
from src.run.runtime import bf16_supported, cpu_flags

ARCHITECTURES = [
    ("torchvision", "mobilenet_v2", 160),
    ("torchvision", "vgg19", 160),
    ("torchvision", "resnet50", 160),
    ("torchvision", "convnext_tiny", 160),
    ("torchvision", "efficientnet_b0", 160),
    ("torchvision", "mobilenet_v3_large", 160),
    ("torchvision", "densenet121", 160),
    ("torchvision", "regnet_y_400mf", 160),
    ("torchvision", "swin_t", 224),
    ("torchvision", "vit_b_16", 224),
    ("timm", "resnet18", 160),
    ("timm", "convnext_atto", 160),
    ("timm", "vit_tiny_patch16_224", 224),
    ("timm", "tf_efficientnet_lite0", 160),
]


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    bf16 = bf16_supported("cpu")
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    print(f"{cpu_name()} ({', '.join(flags)}), {torch.get_num_threads()} threads, bf16={bf16}")
    print("\n| source | backbone | size | features | params | extraction img/s |")
    print("|---|---|---|---|---|---|")
    for source, name, size in ARCHITECTURES:
        target = f"src.backbones.{source}_backbone"
        model = TransferModel({"_target_": target, "name": name, "weights": None}, ["a", "b"], size)
        images = torch.randint(0, 256, (args.images, 3, size, size), dtype=torch.uint8)
        cpu = torch.device("cpu")
        extract(model, chunks(images[: args.batch], args.batch), cpu, bf16)  # warm-up
        start = time.perf_counter()
        extract(model, chunks(images, args.batch), cpu, bf16)
        rate = args.images / (time.perf_counter() - start)
        params = sum(p.numel() for p in model.backbone.parameters())
        print(
            f"| {source} | {name} | {size} | {model.spec.num_features} | {params:,} | {rate:.0f} |"
        )


if __name__ == "__main__":
    main()
