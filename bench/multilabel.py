"""Multi-label benchmark on real images: 2x2 mosaics of Fashion-MNIST test images (Debian's
dataset-fashion-mnist), labels = the classes present, written as images + labels.csv; then
`python -m src.train data=table` per seed: frozen EfficientNet-Lite0 with defaults (the per-label
probe) and, with --lpft-seeds, finetune=lpft. Prints a table of test mAP (bootstrap 95%
interval per run, and the mean with a t interval over seeds).

    PYTHONPATH=$PWD python bench/multilabel.py --images 600 --seeds 0 1 2 --lpft-seeds 0 1
"""

import argparse
import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from src.report.stats import mean_interval

FASHION = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
           "boot"]  # fmt: skip


def fashion_test() -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 Fashion-MNIST test images (28 x 28 uint8) and their labels."""
    with gzip.open(FASHION / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images, labels


def build(root: Path, count: int, seed: int = 0) -> Path:
    """`count` mosaics of 4 random test images each; labels.csv lists the classes present."""
    images, labels = fashion_test()
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = ["path,labels"]
    for i in range(count):
        picks = rng.choice(len(images), 4, replace=False)
        tiles = images[picks]
        mosaic = np.block([[tiles[0], tiles[1]], [tiles[2], tiles[3]]])
        Image.fromarray(np.stack([mosaic] * 3, -1)).save(root / f"m{i}.png")
        rows.append(f"m{i}.png,{' '.join(sorted({CLASSES[labels[p]] for p in picks}))}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def run(table: Path, out: Path, seed: int, extra: list[str]) -> dict:
    """One training run; its result.json."""
    command = [sys.executable, "-m", "src.train", "data=table", f"data.root={table}",
               "backbone=efficientnet_lite0", "image_size=112", "trainer=cpu", "logger=none",
               f"seed={seed}", f"output_dir={out}", f"hydra.run.dir={out}",
               f"cache_dir={table.parent / 'features'}", *extra]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    line = re.search(r"^RESULT .*$", done.stdout, re.M)
    if done.returncode or not line:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    print(line.group(0), flush=True)
    return json.loads((out / "result.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lpft-seeds", type=int, nargs="*", default=[])
    parser.add_argument("--lpft-epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_multilabel"))
    args = parser.parse_args()
    table = build(args.out / "data", args.images)
    setups = {"frozen (probe)": ([], args.seeds),
              f"lpft {args.lpft_epochs} ep": (["finetune=lpft",
               f"trainer.max_epochs={args.lpft_epochs}", "optimizer=adamw", "optimizer.lr=1e-3"],
               args.lpft_seeds)}  # fmt: skip
    print("| setup | seed | test mAP [95% bootstrap] | micro F1 | macro F1 | subset acc | "
          "Hamming | wall s |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    rows = []
    for name, (extra, seeds) in setups.items():
        maps = []
        for seed in seeds:
            r = run(table, args.out / f"{name.split()[0]}-{seed}", seed, extra)
            low, high = r["test/mAP_ci95"]
            maps.append(r["test/mAP"])
            rows.append(f"| {name} | {seed} | {r['test/mAP']:.3f} [{low:.3f}, {high:.3f}] | "
                        f"{r['test/micro_f1']:.3f} | {r['test/macro_f1']:.3f} | "
                        f"{r['test/subset_acc']:.3f} | {r['test/hamming_loss']:.3f} | "
                        f"{r['wall_s']:.0f} |")  # fmt: skip
            print(rows[-1], flush=True)
        if len(maps) > 1:
            mean, low, high = mean_interval(maps)
            print(f"| {name} | mean of {len(maps)} | {mean:.3f} [{low:.3f}, {high:.3f}] (t) |"
                  " | | | | |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
