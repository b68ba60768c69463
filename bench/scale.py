"""Data at scale: start-up, frozen-feature extraction and fine-tune steps, streamed and in memory.

Generates a synthetic JPEG folder in the published layout once (training/<class>/, 10% in
validation/<class>/; reused when it is there with the same settings), then measures in one
process the images per second and the peak memory of each phase: the data module's start-up
(listing, split and image scan, without and with the scan cache), a frozen-feature extraction
pass over every image (this project's: src.frozen.cache.extract_folder with a random-weight
MobileNetV2, streamed through DataLoader workers), and fine-tune steps of this project's model
(forward, backward, RMSprop; batch 32, 160 px) streamed from disk and, when the images fit in
memory, decoded into memory first. Writes the table to bench/SCALE.md. Run from the repository root:

    python -m bench.scale /tmp/scale-30k --images 30000 --size 256 --classes 6 [--steps 30]
"""

import argparse
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench.train_speed import cpu_model, peak_rss_gib, reset_peak_rss
from src.data.images import usable_cores
from src.data.module import ImageFolderData
from src.frozen.cache import extract_folder
from src.model.module import TransferModel
from src.run.runtime import bf16_supported, keep_freed_memory

SIZE, BATCH, EXTRACT_BATCH, WARMUP = 160, 32, 64, 2
MARKER = ".bench-folder.json"  # the settings a generated folder was made with


def write_image(path: Path, size: int, seed: int) -> None:
    """A photo-like JPEG: a smooth random colour field with mild noise (noise alone compresses
    and decodes unlike photos)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
    noisy = smooth + rng.integers(-12, 13, smooth.shape, dtype=np.int16)
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def make_folder(root: Path, images: int, size: int, classes: int) -> str:
    """The folder `root` with `images` JPEGs of `size` px in `classes` classes, written once."""
    settings = {"images": images, "size": size, "classes": classes}
    marker = root / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return "reused"
    if root.exists() and any(root.iterdir()) and not marker.is_file():
        raise SystemExit(f"{root} is not empty and not a folder of this benchmark: give another")
    for top in ("training", "validation"):
        shutil.rmtree(root / top, ignore_errors=True)
    jobs = []
    for i in range(images):
        top = "validation" if (i // classes) % 10 == 9 else "training"
        folder = root / top / f"class_{i % classes}"
        jobs.append((folder / f"image_{i:06d}.jpg", i))
    for folder in {path.parent for path, _ in jobs}:
        folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with ThreadPoolExecutor(usable_cores()) as pool:
        list(pool.map(lambda job: write_image(job[0], size, job[1]), jobs))
    marker.write_text(json.dumps(settings))
    return f"written in {time.perf_counter() - start:.0f} s"


def children() -> list[int]:
    """The process ids of this process's children (the DataLoader workers)."""
    pids = []
    for task in Path("/proc/self/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


class WorkerPeaks:
    """The peak resident memory (VmHWM) of each worker seen, sampled during a phase."""

    def __init__(self) -> None:
        self.peaks: dict[int, int] = {}
        self.stopped = threading.Event()

    def sample(self) -> None:
        for pid in children():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:  # ended meanwhile
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    self.peaks[pid] = max(self.peaks.get(pid, 0), int(line.split()[1]) * 1024)

    def watch(self, every_s: float = 0.5) -> None:
        """Sample until `stop()` (run in a thread during a phase that owns its loop)."""
        self.stopped = threading.Event()
        while not self.stopped.wait(every_s):
            self.sample()

    def stop(self) -> None:
        self.stopped.set()

    def largest_gib(self) -> float:
        return max(self.peaks.values(), default=0) / 2**30


def sampled(items: Iterable[Any], peaks: WorkerPeaks) -> Iterator[Any]:
    """`items`, sampling the workers' memory after each."""
    for item in items:
        peaks.sample()
        yield item


def startup(root: Path, cache: Path, **kwargs: Any) -> tuple[ImageFolderData, float]:
    """The data module of `root` at SIZE px and the seconds its construction took."""
    start = time.perf_counter()
    data = ImageFolderData(
        str(root), image_size=SIZE, batch_size=BATCH, scan_cache=str(cache), **kwargs
    )
    return data, time.perf_counter() - start


def mobilenet_v2(classes: int, freeze: bool) -> TransferModel:
    """This project's model: random-weight MobileNetV2 with a new head, frozen or learning."""
    torch.manual_seed(0)
    backbone = {"_target_": "src.backbones.torchvision_backbone", "name": "mobilenet_v2"}
    return TransferModel(
        {**backbone, "weights": None}, [f"class_{c}" for c in range(classes)], freeze=freeze
    )


def extraction(data: ImageFolderData, classes: int, bf16: bool) -> dict[str, Any]:
    """One frozen-feature pass over every image of the folder, as a frozen run's cache fill:
    src.frozen.cache.extract_folder (streamed through DataLoader workers)."""
    model, peaks = mobilenet_v2(classes, freeze=True), WorkerPeaks()
    start = time.perf_counter()
    sampler = threading.Thread(target=peaks.watch, daemon=True)
    sampler.start()
    features = extract_folder(model, data, torch.device("cpu"), bf16, EXTRACT_BATCH)
    peaks.stop()
    seconds = time.perf_counter() - start
    return {
        "images": len(features),
        "s": seconds,
        "img/s": len(features) / seconds,
        "workers": peaks,
    }


def finetune(data: ImageFolderData, steps: int, classes: int, bf16: bool) -> dict[str, Any]:
    """`steps` fine-tune steps of this project's model (bf16 autocast where native,
    channels_last) on the training loader, after WARMUP untimed ones."""
    model = mobilenet_v2(classes, freeze=False).train()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-4)
    peaks = WorkerPeaks()
    start = time.perf_counter()
    batches = iter(sampled(data.train_dataloader(), peaks))
    first = 0.0
    for step in range(WARMUP + steps):
        if step == WARMUP:
            timed = time.perf_counter()
        images, labels = next(batches)
        if step == 0:
            first = time.perf_counter() - start
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(images).float(), labels)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - timed
    del batches  # ends the workers
    return {
        "images": steps * BATCH,
        "s": seconds,
        "img/s": steps * BATCH / seconds,
        "first batch s": first,
        "workers": peaks,
    }


def row(phase: str, result: dict[str, Any]) -> dict[str, Any]:
    """A table row: the phase, its measurements and the peak memory since its reset."""
    peaks: WorkerPeaks | None = result.get("workers")
    return {
        "phase": phase,
        "images": result["images"],
        "s": result["s"],
        "img/s": result["img/s"],
        "first batch s": result.get("first batch s", float("nan")),
        "peak RSS GiB": peak_rss_gib(),
        "workers": len(peaks.peaks) if peaks else 0,
        "worker peak RSS GiB": peaks.largest_gib() if peaks else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where the synthetic folder is (or goes)")
    parser.add_argument("--images", type=int, default=30_000)
    parser.add_argument("--size", type=int, default=256, help="side of the JPEGs, px")
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--steps", type=int, default=30, help="timed fine-tune steps per mode")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "SCALE.md")
    args = parser.parse_args()
    if args.steps < 1 or args.images < 10 * args.classes:
        parser.error("--steps must be at least 1, --images at least 10 per class")
    keep_freed_memory()
    bf16 = bf16_supported("cpu")
    made = make_folder(args.folder, args.images, args.size, args.classes)
    print(f"folder {args.folder}: {args.images} images, {made}")
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for phase in ("start-up, no scan cache", "start-up, scan cache"):
            reset_peak_rss()
            data, seconds = startup(args.folder, Path(cache), in_memory=False)
            rows.append(
                row(phase, {"images": args.images, "s": seconds, "img/s": args.images / seconds})
            )
        reset_peak_rss()
        rows.append(row("extract features, streamed", extraction(data, args.classes, bf16)))
        reset_peak_rss()
        rows.append(
            row("fine-tune steps, streamed", finetune(data, args.steps, args.classes, bf16))
        )
        del data
        memory, _ = startup(args.folder, Path(cache))  # in_memory=auto: only if it fits
        if memory.streaming:
            note = "The decoded images do not fit the in-memory limit: no in-memory rows."
        else:
            reset_peak_rss()
            start = time.perf_counter()
            memory.setup()
            seconds = time.perf_counter() - start
            count = sum(len(s.paths) for s in memory.splits().values())
            rows.append(
                row("decode into memory", {"images": count, "s": seconds, "img/s": count / seconds})
            )
            reset_peak_rss()
            rows.append(
                row("fine-tune steps, in memory", finetune(memory, args.steps, args.classes, bf16))
            )
            note = (
                "In memory, peak RSS includes the decoded images (3 x 160^2 bytes each). "
                "Main-process loaders there use no workers (data.num_workers=auto)."
            )
    keys = list(rows[0])
    lines = [
        f"# Data at scale: {cpu_model()}, {usable_cores()} usable cores, torch {torch.__version__}",
        "",
        f"{args.images:,} synthetic {args.size} px JPEGs in {args.classes} classes (90% "
        f"training/, 10% validation/), decoded to {SIZE} px. One process; streamed loaders use "
        f"{usable_cores()} DataLoader workers (the usable cores). Start-up: the data module's "
        "construction (listing, image scan, split). Extraction: this project's frozen-feature "
        f"pass (src.frozen.cache.extract_folder: random-weight MobileNetV2, BatchNorm folded, "
        f"bf16={bf16}, batch {EXTRACT_BATCH}), every image once, streamed. Fine-tune: this "
        f"project's model (TransferModel, channels_last, bf16 autocast={bf16}), forward + "
        f"backward + RMSprop, batch {BATCH}, {args.steps} timed steps after {WARMUP} untimed "
        "ones (first batch s: from creating the loader to the first batch). Peak RSS: the main "
        "process's VmHWM since the phase began (reset through /proc/self/clear_refs); a "
        "worker's peak counts the pages it shares with the main process too.",
        "",
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
    ]
    for r in rows:
        cells = [
            f"{v:,.2f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else v
            for v in r.values()
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", note]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
