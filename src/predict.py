"""Top-k classes of images from a checkpoint: `python -m src.predict ckpt_path=... inputs=...`."""

import csv
import json
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from src.data import IMAGE_EXTENSIONS, decode_all, list_images
from src.errors import UserError, exit_on_user_error
from src.inference import chunks, load_checkpoint, logits, pick_device


def image_paths(inputs: str | None) -> list[Path]:
    """`inputs` as a list of image files: the file itself or the images directly in a folder."""
    fix = "Fix: inputs=<an image file or a folder of images>"
    if not inputs:
        raise UserError(f"no inputs given. {fix}")
    path = Path(inputs)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"inputs {path} not found. {fix}")
    paths = list_images(path)
    if not paths:
        kinds = " ".join(sorted(IMAGE_EXTENSIONS))
        raise UserError(f"no images ({kinds}) directly in folder {path}. {fix}")
    return paths


def top_k(probs: torch.Tensor, classes: list[str], k: int) -> list[list[tuple[str, float]]]:
    """Per image, the `k` most probable (class, probability) pairs, most probable first."""
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    return [
        [(classes[i], float(p)) for p, i in zip(row_p.tolist(), row_i.tolist(), strict=True)]
        for row_p, row_i in zip(values, indices, strict=True)
    ]


def format_table(paths: list[Path], tops: list[list[tuple[str, float]]]) -> str:
    """A fixed-width table: one row per image, `class probability` per rank."""
    cells = [[f"{name} {p:.3f}" for name, p in top] for top in tops]
    header = ["image"] + [f"top{rank + 1}" for rank in range(len(cells[0]))]
    rows = [header] + [[str(path)] + row for path, row in zip(paths, cells, strict=True)]
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    """Print and write (`predictions.csv`, `predictions.json`) the top-k classes of each input."""
    if cfg.top_k < 1:
        raise UserError(f"top_k={cfg.top_k} must be at least 1. Fix: top_k=3")
    paths = image_paths(cfg.inputs)
    model = load_checkpoint(cfg.ckpt_path)
    images = decode_all(paths, model.hparams.image_size)
    probs = logits(model, chunks(images, 64), pick_device(cfg.device)).softmax(1)
    tops = top_k(probs, list(model.hparams.classes), cfg.top_k)
    out = Path(cfg.output_dir)
    records = [
        {"image": str(path), "top": [{"class": c, "probability": p} for c, p in top]}
        for path, top in zip(paths, tops, strict=True)
    ]
    (out / "predictions.json").write_text(json.dumps(records, indent=2))
    with open(out / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "rank", "class", "probability"])
        for path, top in zip(paths, tops, strict=True):
            writer.writerows([path, rank + 1, c, f"{p:.6f}"] for rank, (c, p) in enumerate(top))
    print(format_table(paths, tops))
    print(f"predictions written to {out / 'predictions.csv'} and predictions.json")
    return records


@exit_on_user_error
@hydra.main(config_path="../conf", config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Command-line entry: Hydra composes `cfg` from conf/predict.yaml and the overrides."""
    predict(cfg)


if __name__ == "__main__":
    main()
