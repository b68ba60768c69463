"""Top-k classes of images from a checkpoint: `python -m src.predict ckpt_path=... inputs=...`."""

import csv
import json
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from src.data.scan import input_classes, list_inputs
from src.model.inference import load_checkpoint, logits_of_files, pick_device
from src.report.stats import wilson_interval
from src.run.errors import UserError, exit_on_user_error


def top_k(probs: torch.Tensor, classes: list[str], k: int) -> list[list[tuple[str, float]]]:
    """Per image, the `k` most probable (class, probability) pairs, most probable first."""
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    return [
        [(classes[i], float(p)) for p, i in zip(row_p.tolist(), row_i.tolist(), strict=True)]
        for row_p, row_i in zip(values, indices, strict=True)
    ]


def format_table(
    paths: list[Path], tops: list[list[tuple[str, float]]], errors: dict[int, str]
) -> str:
    """A fixed-width table: one row per image, `class probability` per rank, or its error."""
    ranks = len(tops[0])
    cells = [
        [f"error: {errors[i]}"] + [""] * (ranks - 1)
        if i in errors
        else [f"{name} {p:.3f}" for name, p in top]
        for i, top in enumerate(tops)
    ]
    header = ["image"] + [f"top{rank + 1}" for rank in range(ranks)]
    rows = [header] + [[str(path)] + row for path, row in zip(paths, cells, strict=True)]
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    """Print and write (`predictions.csv`, `predictions.json`) the top-k classes of each input.

    Inputs are an image or a folder searched recursively, decoded in streaming batches; an
    unreadable file is a row with its error; a table (CSV, TSV, JSONL) lists the images. When
    the images sit in folders named after the checkpoint's classes (validation/<class>/...,
    test/<class>/...) or the table has a label column, the accuracy is printed too.
    """
    if cfg.top_k < 1:
        raise UserError(f"top_k={cfg.top_k} must be at least 1. Fix: top_k=3")
    paths = list_inputs(cfg.inputs)
    model = load_checkpoint(cfg.ckpt_path)
    classes = list(model.classes)
    scores, errors = logits_of_files(model, paths, pick_device(cfg.device))
    tops = top_k(scores.nan_to_num(0).softmax(1), classes, cfg.top_k)
    truth = input_classes(paths, cfg.inputs, classes)
    records = [
        {"image": str(path)}
        | (
            {"error": errors[i]}
            if i in errors
            else {"top": [{"class": c, "probability": p} for c, p in tops[i]]}
        )
        | ({"true": truth[i]} if truth else {})
        for i, path in enumerate(paths)
    ]
    out = Path(cfg.output_dir)
    (out / "predictions.json").write_text(json.dumps(records, indent=2))
    with open(out / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "rank", "class", "probability", "error"])
        for i, path in enumerate(paths):
            if i in errors:
                writer.writerow([path, "", "", "", errors[i]])
            else:
                writer.writerows(
                    [path, rank + 1, c, f"{p:.6f}", ""] for rank, (c, p) in enumerate(tops[i])
                )
    print(format_table(paths, tops, errors))
    if truth and set(truth) <= set(classes):
        read = [i for i in range(len(paths)) if i not in errors]
        right = sum(tops[i][0][0] == truth[i] for i in read)
        low, high = wilson_interval(right, len(read)) if read else (float("nan"),) * 2
        given = "table" if Path(cfg.inputs).is_file() else "folder"
        print(
            f"accuracy {right / max(1, len(read)):.4f} ({right} of {len(read)} images by their "
            f"{given}'s class; 95% interval {low:.4f}-{high:.4f})"
        )
    if errors:
        print(f"{len(errors)} file(s) could not be read: their rows say why")
    print(f"predictions written to {out / 'predictions.csv'} and predictions.json")
    return records


@exit_on_user_error
@hydra.main(config_path="../conf", config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Command-line entry: Hydra composes `cfg` from conf/predict.yaml and the overrides."""
    predict(cfg)


if __name__ == "__main__":
    main()
