"""Training speed at the published experiment's shape, in one process.

1,494 images at 160 px (1,344 train, 150 test), batch 32, random weights, for MobileNetV2 and
VGG19: the plain frozen loop (fp32, default memory format and allocator, backbone recomputed every
epoch), this project's cached frozen run for 50 epochs (feature extraction included, Lightning
Trainer), and full fine-tune steps, plain and this project's. Prints a table and writes it to
bench/RESULTS.md.

    python bench/train_speed.py [--epochs 50] [--backbones mobilenet_v2 vgg19]
"""

import argparse
import ctypes
import ctypes.util
import gc
import os
import platform
import resource
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from src.data import decode_all
from src.features import extract
from src.model import TransferModel
from src.runtime import bf16_supported, keep_freed_memory, quiet_lightning

N_TRAIN, N_TEST, SIZE, BATCH, CLASSES = 1344, 150, 160, 32, 6


def rate(step, images_per_call: int, calls: int, warmup: int = 2) -> float:
    """Images per second of `step()` over `calls` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    return images_per_call * calls / (time.perf_counter() - start)


def plain_network(name: str, frozen: bool) -> nn.Sequential:
    """torchvision's backbone -> pooling -> Linear, fp32 and NCHW, as a plain loop builds it."""
    backbone = torchvision.models.get_model(name, weights=None).features
    num_features = backbone(torch.zeros(1, 3, 64, 64)).shape[1]
    if frozen:
        backbone.eval().requires_grad_(False)
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return nn.Sequential(backbone, pool, nn.Linear(num_features, CLASSES))


def plain_step(net: nn.Sequential) -> Callable[[], None]:
    """One plain training step (forward, backward, RMSprop) on a random batch."""
    optimizer = torch.optim.RMSprop([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    y = torch.randint(0, CLASSES, (BATCH,))

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()

    return step


def plain_epoch_seconds(name: str, calls: int) -> float:
    """Seconds per epoch of a plain frozen loop: the backbone runs on every batch."""
    net = plain_network(name, frozen=True)
    x = torch.randn(BATCH, 3, SIZE, SIZE)

    def eval_step() -> None:
        with torch.no_grad():
            net(x)

    train = rate(plain_step(net), BATCH, calls)
    return N_TRAIN / train + N_TEST / rate(eval_step, BATCH, calls)


def make_model(name: str, frozen: bool) -> TransferModel:
    backbone = {"_target_": "src.backbones.torchvision_backbone", "name": name, "weights": None}
    optimizer = partial(torch.optim.RMSprop, lr=1e-4, alpha=0.9, eps=1e-7)
    return TransferModel(backbone, [str(c) for c in range(CLASSES)], SIZE, frozen, optimizer)


def cached_run(name: str, images: torch.Tensor, labels: torch.Tensor, epochs: int, bf16: bool):
    """This project's frozen path: extract features once, then a Lightning run on them."""
    model = make_model(name, frozen=True)
    start = time.perf_counter()
    features = extract(model, images, torch.device("cpu"), bf16)
    extract_s = time.perf_counter() - start
    train = TensorDataset(features[:N_TRAIN], labels[:N_TRAIN])
    test = TensorDataset(features[N_TRAIN:], labels[N_TRAIN:])
    data = L.LightningDataModule.from_datasets(train, test, test, batch_size=BATCH)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, data)
    return extract_s, time.perf_counter() - start


def finetune_rate(name: str, bf16: bool, calls: int) -> float:
    """Images per second of full fine-tune steps (forward, backward, RMSprop) of this project."""
    model = make_model(name, frozen=False).train()
    optimizer = model.configure_optimizers()
    x = torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), dtype=torch.uint8)
    y = torch.randint(0, CLASSES, (BATCH,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return rate(step, BATCH, calls)


def forward_gflop(name: str) -> float:
    """GFLOP of one image's backbone forward pass at SIZE px."""
    model = make_model(name, frozen=True)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.features(torch.zeros(1, 3, SIZE, SIZE))
    return counter.get_total_flops() / 1e9


def matmul_peak_gflops(dtype: torch.dtype, n: int = 2048, calls: int = 10) -> float:
    """Measured dense matmul throughput."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return rate(lambda: a @ b, 2 * n**3, calls) / 1e9


def decode_rate(count: int = 300) -> float:
    """Images per second of decode_all on 640x480 JPEGs, resized to SIZE."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(count):
            path = Path(tmp) / f"{i}.jpg"
            noise = torch.randint(0, 256, (480, 640, 3), dtype=torch.uint8).numpy()
            Image.fromarray(noise).save(path, quality=90)
            paths.append(path)
        start = time.perf_counter()
        decode_all(paths, SIZE)
        return count / (time.perf_counter() - start)


def cpu_model() -> str:
    """CPU model name, family/model numbers and its bf16 instruction sets, from /proc/cpuinfo."""
    info: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    if "model name" not in info:
        return platform.processor() or "unknown"
    bf16 = [f for f in info.get("flags", "").split() if f in ("avx512_bf16", "amx_bf16")]
    return (
        f"{info['model name']} (family {info.get('cpu family')}, model {info.get('model')}; "
        f"{', '.join(bf16) or 'no bf16 instructions'})"
    )


def reset_peak_rss() -> None:
    """Start a new peak-RSS measurement from the memory in use now (Linux, glibc)."""
    gc.collect()
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)  # give back what earlier parts freed
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def peak_rss_gib() -> float:
    """Peak resident memory of this process since start or the last reset_peak_rss."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--backbones", nargs="+", default=["mobilenet_v2", "vgg19"])
    parser.add_argument("--calls", type=int, default=6, help="timed batches per rate")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = parser.parse_args()
    quiet_lightning()
    torch.manual_seed(0)
    images = torch.randint(0, 256, (N_TRAIN + N_TEST, 3, SIZE, SIZE), dtype=torch.uint8)
    labels = torch.randint(0, CLASSES, (N_TRAIN + N_TEST,))
    bf16 = bf16_supported("cpu")

    plain, plain_finetune = {}, {}
    for name in args.backbones:  # before this program's allocator setting touches the process
        plain[name] = plain_epoch_seconds(name, args.calls)
        plain_finetune[name] = rate(
            plain_step(plain_network(name, frozen=False).train()), BATCH, args.calls
        )
    plain_rss = peak_rss_gib()
    keep_freed_memory()
    rows = []
    for name in args.backbones:
        reset_peak_rss()
        extract_s, cached_s = cached_run(name, images, labels, args.epochs, bf16)
        cached_rss = peak_rss_gib()
        extract_rate = len(images) / extract_s
        rows.append(
            {
                "backbone": name,
                "plain frozen img/s": (N_TRAIN + N_TEST) / plain[name],
                "plain s/epoch": plain[name],
                f"plain {args.epochs} epochs s": plain[name] * args.epochs,
                "extract img/s": extract_rate,
                "extract GFLOP/s": forward_gflop(name) * extract_rate,
                "cached s/epoch (after extract)": (cached_s - extract_s) / args.epochs,
                f"cached {args.epochs} epochs s": cached_s,
                "plain/cached": plain[name] * args.epochs / cached_s,
                "cached run peak RSS GiB": cached_rss,
                "plain fine-tune img/s": plain_finetune[name],
                "fine-tune img/s": finetune_rate(name, bf16, args.calls),
            }
        )
    peak_bf16 = matmul_peak_gflops(torch.bfloat16) if bf16 else float("nan")
    peak_fp32 = matmul_peak_gflops(torch.float32)
    keys = list(rows[0])
    lines = [
        f"# Training speed: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "",
        f"1,494 images at {SIZE} px ({N_TRAIN} train, {N_TEST} test), batch {BATCH}, random "
        "weights, one process. Plain (measured first): torchvision layers in fp32, NCHW, glibc's "
        "default malloc settings; frozen runs the backbone every epoch (peak RSS "
        f"{plain_rss:.2f} GiB). Cached: this program's allocator setting, extraction once "
        f"(bf16={bf16} autocast, channels_last, BatchNorm folded into the convolutions), then "
        f"{args.epochs} Lightning epochs on the features. Fine-tune: bf16={bf16} autocast + "
        "channels_last (strided depthwise convolutions in float32), forward + backward + "
        "RMSprop step.",
        "",
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
    ]
    for row in rows:
        cells = [f"{v:,.2f}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Matmul peak (2048^2, measured): bf16 {peak_bf16:,.0f} GFLOP/s, fp32 {peak_fp32:,.0f} "
        "GFLOP/s. Extraction GFLOP/s counts the backbone forward's FLOPs (torch FlopCounterMode).",
        "",
        f"Decode + resize to {SIZE} px (640x480 JPEG, decode_all): {decode_rate():,.0f} img/s.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
