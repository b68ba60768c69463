"""Training speed at the published experiment's shape, per CPU kind.

1,494 images at 160 px (1,344 train, 150 test), batch 32, random weights, for MobileNetV2 and
VGG19: the plain frozen loop (fp32, NCHW, default allocator, backbone recomputed every epoch),
this project's extraction, the command line's frozen run for 50 epochs on a folder of that shape
(`python -m src.train`: its wall time, the time from its start to the first training batch, its
cached epochs), the fine-tune command's time to its first batch, and full fine-tune steps, plain
and this project's. `--kinds native avx2` measures the machine as it is and, in a subprocess,
restricted to AVX2 kernels (ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2), as an AVX2-only
CPU runs. Prints a table and writes it to bench/RESULTS.md.

    python -m bench.train_speed [--epochs 50] [--backbones mobilenet_v2 vgg19] [--kinds native]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bench import kinds
from src.data.images import decode_all
from src.frozen.cache import extract
from src.model.module import TransferModel
from src.run.runtime import bf16_supported, cpu_kind, keep_freed_memory, quiet_lightning

N_TRAIN, N_TEST, SIZE, BATCH, CLASSES = 1344, 150, 160, 32, 6
TORCHVISION = "src.backbones.torchvision_backbone"


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


def make_model(name: str, frozen: bool, target: str = TORCHVISION) -> TransferModel:
    """This project's model of backbone `name` (random weights) built by `target`."""
    backbone = {"_target_": target, "name": name, "weights": None}
    optimizer = partial(torch.optim.RMSprop, lr=1e-4, alpha=0.9, eps=1e-7)
    return TransferModel(backbone, [str(c) for c in range(CLASSES)], SIZE, frozen, optimizer)


def write_folder(root: Path) -> Path:
    """The published layout at its size: 224 noise JPEGs per class in training/ (1,344) and 25
    per class in validation/ (150, the test set)."""
    generator = torch.Generator().manual_seed(0)
    for split, per_class in (("training", N_TRAIN // CLASSES), ("validation", N_TEST // CLASSES)):
        for c in range(CLASSES):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (SIZE, SIZE, 3), generator=generator)
                Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / f"{i}.jpg")
    return root


# Runs a command from a small process and reports its peak RSS: a child forked straight from this
# bench would inherit the bench's own high-water mark (Linux carries it across fork and exec).
LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write(f"MAXRSS_KB {usage.ru_maxrss}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def cli_run(root: Path, backbone: str, overrides: list[str]) -> dict[str, float]:
    """`python -m src.train` on `root`: wall, peak RSS and what its result.json says
    (first_batch_s, mean_epoch_s, first_epoch_s, fit_s, the training images)."""
    with tempfile.TemporaryDirectory() as run_dir:
        command = [
            sys.executable, "-m", "src.train", f"backbone={backbone}", "backbone.weights=null",
            "data=imagefolder", f"data.root={root}", "logger=none", "cache_dir=null",
            f"hydra.run.dir={run_dir}", *overrides,
        ]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", LAUNCHER, *command],
            cwd=kinds.ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr[-2000:]}")
        result = json.loads((Path(run_dir) / "result.json").read_text())
    peak_kb = int(done.stderr.rsplit("MAXRSS_KB ", 1)[1].split()[0])
    return {
        "wall_s": wall,
        "first_batch_s": result["first_batch_s"],
        "epoch_s": result["mean_epoch_s"],
        "first_epoch_s": result["first_epoch_s"],
        "fit_s": result["fit_s"],
        "train_images": result["split"]["splits"]["train"]["count"],
        "peak_rss_gib": peak_kb / 2**20,
    }


def finetune_step(model: TransferModel, bf16: bool, batch: int) -> Callable[[], None]:
    """One full fine-tune step of `model` (forward, backward, RMSprop) on a random uint8 batch."""
    optimizer = model.train().configure_optimizers()
    x = torch.randint(0, 256, (batch, 3, SIZE, SIZE), dtype=torch.uint8)
    y = torch.randint(0, CLASSES, (batch,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def finetune_rate(name: str, bf16: bool, calls: int) -> float:
    """Images per second of full fine-tune steps (forward, backward, RMSprop) of this project."""
    return rate(finetune_step(make_model(name, frozen=False), bf16, BATCH), BATCH, calls)


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


def measure(backbones: list[str], epochs: int, calls: int) -> list[dict[str, object]]:
    """One row per backbone on the kernels this process may use."""
    quiet_lightning()
    torch.manual_seed(0)
    images = torch.randint(0, 256, (N_TRAIN + N_TEST, 3, SIZE, SIZE), dtype=torch.uint8)
    bf16 = bf16_supported("cpu")
    plain, plain_finetune = {}, {}
    for name in backbones:  # before this program's allocator setting touches the process
        plain[name] = plain_epoch_seconds(name, calls)
        plain_finetune[name] = rate(
            plain_step(plain_network(name, frozen=False).train()), BATCH, calls
        )
    keep_freed_memory()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = write_folder(Path(tmp) / "shoes")
        for name in backbones:
            start = time.perf_counter()
            extract(make_model(name, frozen=True), images.split(64), torch.device("cpu"), bf16)
            extract_rate = len(images) / (time.perf_counter() - start)
            frozen = cli_run(root, name, ["head_fit=recipe", f"trainer.max_epochs={epochs}"])
            finetune = cli_run(
                root,
                name,
                ["freeze=false", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
                 "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1"],
            )  # fmt: skip
            rows.append(
                {
                    "kind": cpu_kind(),
                    "precision": "bf16" if bf16 else "fp32",
                    "backbone": name,
                    "plain frozen img/s": (N_TRAIN + N_TEST) / plain[name],
                    f"plain {epochs} epochs s": plain[name] * epochs,
                    "extract img/s": extract_rate,
                    "extract GFLOP/s": forward_gflop(name) * extract_rate,
                    f"frozen run ({epochs} epochs) wall s": frozen["wall_s"],
                    "frozen run: first batch s": frozen["first_batch_s"],
                    "cached epoch ms": frozen["fit_s"] / epochs * 1000,
                    "plain/frozen run": plain[name] * epochs / frozen["wall_s"],
                    "frozen run peak RSS GiB": frozen["peak_rss_gib"],
                    "fine-tune run: first batch s": finetune["first_batch_s"],
                    "plain fine-tune img/s": plain_finetune[name],
                    "fine-tune img/s": finetune_rate(name, bf16, calls),
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--backbones", nargs="+", default=["mobilenet_v2", "vgg19"])
    parser.add_argument("--calls", type=int, default=6, help="timed batches per rate")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args, rows = kinds.rows_per_kind(
        parser, "bench.train_speed", lambda a: measure(a.backbones, a.epochs, a.calls)
    )
    peak_bf16 = matmul_peak_gflops(torch.bfloat16) if bf16_supported("cpu") else float("nan")
    peak_fp32 = matmul_peak_gflops(torch.float32)
    intro = (
        f"torch {torch.__version__}. 1,494 images at {SIZE} px ({N_TRAIN} train, {N_TEST} test),"
        f" batch {BATCH}, random weights. `avx2`: the same machine restricted with "
        f"{kinds.RESTRICTION}, as an AVX2-only CPU runs (no bf16). Plain (measured first): "
        "torchvision layers in fp32, NCHW, glibc's default malloc settings; frozen runs the "
        "backbone every epoch. Extract: this project's extraction (the precision column's "
        "autocast, the memory format src.run.runtime.memory_format picks, BatchNorm folded). Frozen"
        " run: `python -m src.train backbone=<name> backbone.weights=null head_fit=recipe "
        f"trainer.max_epochs={args.epochs}` on a folder of JPEGs of that shape (wall time with "
        "start-up; first batch: seconds from the process's start to the first training batch, "
        "extraction included; cached epoch: its training loop's wall time over its epochs, "
        "validation and checkpoints included). Fine-tune run: the same with freeze=false "
        "(images decoded, the before-training test done). Fine-tune img/s: this project's "
        "model, forward + backward + RMSprop step."
    )
    notes = [
        f"Matmul peak (2048^2, measured, unrestricted): bf16 {peak_bf16:,.0f} GFLOP/s, fp32 "
        f"{peak_fp32:,.0f} GFLOP/s. Extraction GFLOP/s counts the backbone forward's FLOPs "
        "(torch FlopCounterMode).",
        f"Decode + resize to {SIZE} px (640x480 JPEG, decode_all): {decode_rate():,.0f} img/s.",
    ]
    kinds.write_section(args.out, "Training speed per CPU kind", intro, rows, notes)


if __name__ == "__main__":
    main()
