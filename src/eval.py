"""Evaluate a checkpoint on a test set: `python -m src.eval ckpt_path=... [data=...]`.

Writes `report.md`, `metrics.json`, `confusion_matrix.png` and `misclassified.png` (a
multi-label checkpoint: `per_label.png`) in the run dir and logs the figures to TensorBoard.
"""

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from src.data.images import decode_all
from src.data.module import ImageFolderData
from src.data.splits import split_settings
from src.model.inference import label_thresholds, load_checkpoint, logits_of_files, pick_device
from src.report.figures import confusion_matrix_figure, image_grid_figure
from src.report.labels import label_figure, label_metrics, label_report
from src.report.stats import wilson_interval
from src.run.errors import UserError, exit_on_user_error
from src.trust.predictions import trusted_outputs
from src.trust.report import trust_figures, trust_lines, trust_metrics

log = logging.getLogger(__name__)
ECE_KEYS = ("test_ece_before_calibration", "test_ece_after_calibration")


def class_metrics(preds: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """Confusion matrix (rows true, columns predicted) and per-class precision/recall/F1/support."""
    n = len(classes)
    matrix = multiclass_confusion_matrix(preds, labels, n)
    scores = {
        "precision": multiclass_precision(preds, labels, n, average=None),
        "recall": multiclass_recall(preds, labels, n, average=None),
        "f1": multiclass_f1_score(preds, labels, n, average=None),
    }
    per_class = {
        name: {key: float(value[c]) for key, value in scores.items()}
        | {"support": int(matrix[c].sum())}
        for c, name in enumerate(classes)
    }
    macro = {key: float(value.mean()) for key, value in scores.items()} | {"support": len(labels)}
    return {"per_class": per_class, "macro_avg": macro, "confusion_matrix": matrix.tolist()}


def markdown_report(metrics: dict[str, Any]) -> str:
    """The metrics as a Markdown report that embeds the two figures."""
    classes = list(metrics["per_class"])
    rows = [
        f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
        for name, m in [*metrics["per_class"].items(), ("macro avg", metrics["macro_avg"])]
    ]
    matrix = [
        f"| **{name}** | " + " | ".join(str(v) for v in counts) + " |"
        for name, counts in zip(classes, metrics["confusion_matrix"], strict=True)
    ]
    source = "the val split of training/, which chose the checkpoint (data.test_fraction=0)"
    return "\n".join(
        [
            f"# Evaluation of {metrics['checkpoint']}",
            "",
            f"Test set: {metrics['n_images']} images of {metrics['data_root']}, "
            + (source if metrics["test_is_val"] else metrics["test_source"]),
            "",
            f"- test accuracy: **{metrics['test_acc']:.4f}** (95% interval "
            f"{metrics['test_acc_ci95'][0]:.4f}-{metrics['test_acc_ci95'][1]:.4f}, Wilson)",
            f"- balanced accuracy: {metrics['test_balanced_acc']:.4f}, macro F1: "
            f"{metrics['macro_avg']['f1']:.4f}",
            f"- test loss: {metrics['test_loss']:.4f}",
            f"- misclassified: {metrics['n_misclassified']}",
            "",
            "## Per class",
            "",
            "| class | precision | recall | F1 | support |",
            "|---|---|---|---|---|",
            *rows,
            "",
            "## Confusion matrix (rows: true class, columns: predicted)",
            "",
            "| true \\ predicted | " + " | ".join(classes) + " |",
            "|---" * (len(classes) + 1) + "|",
            *matrix,
            "",
            "![confusion matrix](confusion_matrix.png)",
            "",
            "## Misclassified images (most confident first)",
            "",
            "![misclassified images](misclassified.png)",
            "",
            "## Calibration and unknown",
            "",
            *trust_lines(metrics),
            "",
        ]
    )


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate `cfg.ckpt_path` on `cfg.data`'s test set; write and log the report."""
    model = load_checkpoint(cfg.ckpt_path)
    classes = list(model.classes)
    record = model.record.get("split")  # the training run's split: its seed and fractions
    data: ImageFolderData = instantiate(
        cfg.data,
        image_size=model.image_size,
        resize=model.resize,
        **(split_settings(record) if record else {}),
    )
    if record is None:
        log.warning(
            "%s records no split (written before splits were recorded): without validation/, "
            "its test split may hold images it trained on",
            cfg.ckpt_path,
        )
    elif not data.test_given:
        data.check_split(record)  # the same held-out images, or one line saying why not
    if data.classes != classes:
        raise UserError(
            f"the data's classes {data.classes} differ from the checkpoint's {classes}. "
            "Fix: data.root=<the folder the checkpoint was trained on, or one with its classes>"
        )
    split = data.test_split
    if not split.paths:
        raise UserError(f"no test images in {data.root}. Fix: data.root=<a folder with images>")
    about = {
        "checkpoint": str(cfg.ckpt_path),
        "data_root": str(data.root),
        "test_is_val": data.test_is_val,
        "test_source": data.test_source
        if data.test_given
        else f"the held-out test split of {data.pool} (it chose nothing)",
        "n_images": len(split.paths),
    }
    if getattr(model, "task", "multiclass") == "multilabel":
        return write_label_evaluation(cfg, model, split, about)
    labels = torch.tensor(split.labels)
    out, errors = trusted_outputs(
        model, split.paths, pick_device(cfg.device), cfg.ckpt_path, cfg.ood, cfg.batch_size
    )
    check_decoded(split.paths, errors)
    if out.note:
        log.warning(out.note)
    scores, probs = out.logits, out.probs
    preds = probs.argmax(1)
    wrong = (preds != labels).nonzero().flatten()
    wrong = wrong[probs[wrong, preds[wrong]].argsort(descending=True)]
    metrics = about | {
        "test_acc": float((preds == labels).float().mean()),
        "test_acc_ci95": list(wilson_interval(int((preds == labels).sum()), len(labels))),
        "test_balanced_acc": float(multiclass_accuracy(preds, labels, len(classes), "macro")),
        "test_loss": float(F.cross_entropy(scores, labels)),
        "n_misclassified": len(wrong),
        **class_metrics(preds, labels, classes),
        **trust_metrics(out, labels),
        "misclassified": [
            {
                "image": str(split.paths[i]),
                "true": classes[labels[i]],
                "predicted": classes[preds[i]],
                "probability": float(probs[i, preds[i]]),
            }
            for i in wrong.tolist()
        ],
    }
    shown = wrong[: cfg.max_misclassified].tolist()
    figures = {
        "confusion_matrix": confusion_matrix_figure(
            torch.tensor(metrics["confusion_matrix"]), classes
        ),
        "misclassified": image_grid_figure(
            decode_all([split.paths[i] for i in shown], data.image_size, data.resize),
            [
                f"true: {classes[labels[i]]}\npred: {classes[preds[i]]} ({probs[i, preds[i]]:.2f})"
                for i in shown
            ],
            f"Misclassified: {len(shown)} of {len(wrong)} shown",
        ),
    } | trust_figures(out, labels, metrics)
    logged = ("test_acc", "test_loss", *ECE_KEYS, "share_kept", "accuracy_kept")
    write_evaluation(cfg, metrics, markdown_report(metrics), figures, logged, "## Confusion matrix")
    return metrics


def write_label_evaluation(
    cfg: DictConfig, model: Any, split: Any, about: dict[str, Any]
) -> dict[str, Any]:
    """A multi-label checkpoint's evaluation (src.report.labels) at its own thresholds."""
    logits, errors = logits_of_files(model, split.paths, pick_device(cfg.device), cfg.batch_size)
    check_decoded(split.paths, errors)
    classes = list(model.classes)
    thresholds = torch.tensor(label_thresholds(model))
    targets = torch.tensor(split.labels, dtype=torch.float64)
    metrics = about | label_metrics(logits, targets, thresholds, classes)
    figures = {"per_label": label_figure(metrics["per_label"])}
    logged = ("test_mAP", "test_micro_f1", "test_macro_f1", "test_loss")
    write_evaluation(cfg, metrics, label_report(metrics), figures, logged, "## Per label")
    return metrics


def check_decoded(paths: list[Path], errors: dict[int, str]) -> None:
    """A UserError naming the first test image that could not be decoded, if any."""
    if errors:
        i, why = next(iter(errors.items()))
        raise UserError(f"cannot decode {paths[i]}: {why}. Fix: replace or delete it")


def write_evaluation(
    cfg: DictConfig,
    metrics: dict[str, Any],
    report: str,
    figures: dict[str, Any],
    logged: tuple[str, ...],
    printed_until: str,
) -> None:
    """Write metrics.json, report.md and the figures in the run dir, log the figures and the
    `logged` metrics to TensorBoard, and print the report up to `printed_until`."""
    out = Path(cfg.output_dir)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "report.md").write_text(report)
    for name, figure in figures.items():
        figure.savefig(out / f"{name}.png", dpi=100)
    logger = instantiate(cfg.logger) if cfg.logger else None
    if isinstance(logger, TensorBoardLogger):
        for name, figure in figures.items():
            logger.experiment.add_figure(f"eval/{name}", figure)
        logger.log_metrics(
            {f"eval/{key}": metrics[key] for key in logged if metrics.get(key) is not None}
        )
        logger.finalize("success")
    print(report.split(printed_until)[0].rstrip())
    print(f"\nreport written to {out / 'report.md'}")


@exit_on_user_error
@hydra.main(config_path="../conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Command-line entry: Hydra composes `cfg` from conf/eval.yaml and the overrides."""
    evaluate(cfg)


if __name__ == "__main__":
    main()
