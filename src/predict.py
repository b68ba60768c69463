"""Top-k classes of images from a checkpoint: `python -m src.predict ckpt_path=... inputs=...`."""

import csv
import json
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from src.data.scan import input_classes, list_inputs
from src.model.inference import label_thresholds, load_checkpoint, logits_of_files, pick_device
from src.report.stats import wilson_interval
from src.run.errors import UserError, exit_on_user_error
from src.trust.predictions import Trusted, trusted_outputs


def check_coverage(ood: Any) -> None:
    """A UserError unless `ood` is false or its coverage is null or in (0, 1]."""
    coverage = ood.get("coverage") if ood is not False else None
    if coverage is not None and not (isinstance(coverage, int | float) and 0 < coverage <= 1):
        raise UserError(
            f"ood.coverage={coverage} is invalid: it must be a number in (0, 1] (the share of "
            "the val split kept). Fix: e.g. ood.coverage=0.95, or ood=false"
        )


def trust_line(out: Trusted, read: list[int]) -> str:
    """One line: the temperature, and how many images are `unknown` at which threshold (or why
    there is no `unknown`)."""
    calibrated = f"probabilities at temperature {out.temperature:.3g}"
    if out.unknown is None:
        return f"{calibrated}; {out.note}" if out.note else f"{calibrated}; ood=false: no unknown"
    flagged = int(out.unknown[read].sum())
    return (
        f"{calibrated}; unknown: {flagged} of {len(read)} images (score above {out.threshold:.4g}"
        f", which keeps {out.coverage:.0%} of the training run's val split)"
    )


def top_k(probs: torch.Tensor, classes: list[str], k: int) -> list[list[tuple[str, float]]]:
    """Per image, the `k` most probable (class, probability) pairs, most probable first."""
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    return [
        [(classes[i], float(p)) for p, i in zip(row_p.tolist(), row_i.tolist(), strict=True)]
        for row_p, row_i in zip(values, indices, strict=True)
    ]


def format_table(
    paths: list[Path],
    tops: list[list[tuple[str, float]]],
    errors: dict[int, str],
    unknown: list[bool] | None = None,
) -> str:
    """A fixed-width table: one row per image, `class probability` per rank, or its error; an
    image flagged `unknown` shows that instead of its top class (which follows in brackets)."""
    ranks = len(tops[0])
    cells = [
        [f"error: {errors[i]}"] + [""] * (ranks - 1)
        if i in errors
        else [f"{name} {p:.3f}" for name, p in top]
        for i, top in enumerate(tops)
    ]
    for i, flagged in enumerate(unknown or []):
        if flagged and i not in errors:
            cells[i][0] = f"unknown ({cells[i][0]})"
    header = ["image"] + [f"top{rank + 1}" for rank in range(ranks)]
    rows = [header] + [[str(path)] + row for path, row in zip(paths, cells, strict=True)]
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def write_csv(path: Path, records: list[dict[str, Any]]) -> None:
    """One row per image and rank (the score and `unknown` repeated), or the image's error."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "rank", "class", "probability", "score", "unknown", "error"])
        for r in records:
            if "error" in r:
                writer.writerow([r["image"], "", "", "", "", "", r["error"]])
                continue
            ood = [f"{r['score']:.6f}", r["unknown"]] if "unknown" in r else ["", ""]
            writer.writerows(
                [r["image"], rank + 1, top["class"], f"{top['probability']:.6f}", *ood, ""]
                for rank, top in enumerate(r["top"])
            )


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
    check_coverage(cfg.ood)
    model = load_checkpoint(cfg.ckpt_path)
    classes = list(model.classes)
    if getattr(model, "task", "multiclass") == "multilabel":
        scores, errors = logits_of_files(model, paths, pick_device(cfg.device))
        return predict_labels(cfg, model, paths, scores, errors)
    trusted, errors = trusted_outputs(model, paths, pick_device(cfg.device), cfg.ckpt_path, cfg.ood)
    tops = top_k(trusted.probs, classes, cfg.top_k)
    flags = trusted.unknown.tolist() if trusted.unknown is not None else None
    scores = trusted.score.tolist() if flags else None
    truth = input_classes(paths, cfg.inputs, classes)
    records = [
        {"image": str(path)}
        | (
            {"error": errors[i]}
            if i in errors
            else {"top": [{"class": c, "probability": p} for c, p in tops[i]]}
            | ({"score": scores[i], "unknown": flags[i]} if flags else {})
        )
        | ({"true": truth[i]} if truth else {})
        for i, path in enumerate(paths)
    ]
    out = Path(cfg.output_dir)
    (out / "predictions.json").write_text(json.dumps(records, indent=2))
    write_csv(out / "predictions.csv", records)
    print(format_table(paths, tops, errors, flags))
    print(trust_line(trusted, [i for i in range(len(paths)) if i not in errors]))
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


def predict_labels(
    cfg: DictConfig, model: Any, paths: list[Path], scores: torch.Tensor, errors: dict[int, str]
) -> list[dict[str, Any]]:
    """A multi-label model's predictions: per image every label whose sigmoid probability is at
    or above its threshold (chosen on val, from the checkpoint), and the top-k probabilities;
    printed, and written to predictions.json and predictions.csv (one row per top-k label,
    `predicted` saying whether it passed its threshold)."""
    classes = list(model.classes)
    probs = scores.nan_to_num(0).sigmoid()
    thresholds = torch.tensor(label_thresholds(model))
    tops = top_k(probs, classes, cfg.top_k)
    cut = dict(zip(classes, thresholds.tolist(), strict=True))
    records = []
    for i, path in enumerate(paths):
        if i in errors:
            records.append({"image": str(path), "error": errors[i]})
            continue
        above = [
            (c, p) for c, p in top_k(probs[i : i + 1], classes, len(classes))[0] if p >= cut[c]
        ]
        records.append(
            {
                "image": str(path),
                "labels": [{"label": c, "probability": p} for c, p in above],
                "top": [{"class": c, "probability": p} for c, p in tops[i]],
            }
        )
        print(f"{path}  {', '.join(f'{c} {p:.3f}' for c, p in above) or '(no label)'}")
    out = Path(cfg.output_dir)
    (out / "predictions.json").write_text(json.dumps(records, indent=2))
    with open(out / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "rank", "class", "probability", "predicted", "error"])
        for i, path in enumerate(paths):
            if i in errors:
                writer.writerow([path, "", "", "", "", errors[i]])
                continue
            writer.writerows(
                [path, rank + 1, c, f"{p:.6f}", int(p >= cut[c]), ""]
                for rank, (c, p) in enumerate(tops[i])
            )
    print(f"predictions written to {out / 'predictions.csv'} and predictions.json")
    return records


@exit_on_user_error
@hydra.main(config_path="../conf", config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Command-line entry: Hydra composes `cfg` from conf/predict.yaml and the overrides."""
    predict(cfg)


if __name__ == "__main__":
    main()
