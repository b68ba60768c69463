"""A multi-label checkpoint's evaluation (src.eval): mAP, the metrics at the per-label thresholds
chosen on val (from the checkpoint), and per label AP, precision, recall, F1 and support, as
metrics, a Markdown report and one figure."""

from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from src.model.metrics import multilabel_metrics, per_label_metrics


def label_metrics(
    logits: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor, classes: list[str]
) -> dict[str, Any]:
    """The test figures of a multi-label model's `logits` on 0/1 `targets` (images, labels)."""
    probs = logits.double().sigmoid()
    overall = multilabel_metrics(probs, targets, thresholds)
    return {f"test_{key}": value for key, value in overall.items()} | {
        "test_loss": float(F.binary_cross_entropy_with_logits(logits.double(), targets.double())),
        "per_label": per_label_metrics(probs, targets, thresholds, classes),
    }


def label_report(metrics: dict[str, Any]) -> str:
    """The metrics as Markdown: the overall figures, then one row per label."""
    rows = [
        f"| {m['label']} | {m['ap']:.3f} | {m['precision']:.3f} | {m['recall']:.3f} | "
        f"{m['f1']:.3f} | {m['support']} | {m['threshold']:.3f} |"
        for m in metrics["per_label"]
    ]
    return "\n".join(
        [
            f"# Evaluation of {metrics['checkpoint']}",
            "",
            f"Test set: {metrics['n_images']} images of {metrics['data_root']}, "
            f"{metrics['test_source']}",
            "",
            f"- mAP (macro): **{metrics['test_mAP']:.4f}**",
            f"- at the thresholds chosen on val: micro F1 {metrics['test_micro_f1']:.4f}, macro "
            f"F1 {metrics['test_macro_f1']:.4f}, subset accuracy {metrics['test_subset_acc']:.4f}, "
            f"Hamming loss {metrics['test_hamming_loss']:.4f}",
            f"- test loss (binary cross-entropy): {metrics['test_loss']:.4f}",
            "",
            "## Per label",
            "",
            "| label | AP | precision | recall | F1 | support | threshold |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            "![per-label AP and F1](per_label.png)",
            "",
        ]
    )


def label_figure(per_label: list[dict[str, Any]]) -> Figure:
    """Per label, AP and F1 at its threshold side by side, with the support under each name."""
    figure = Figure(figsize=(max(4.0, 0.6 * len(per_label) + 2), 3.5), layout="constrained")
    ax = figure.subplots()
    x = torch.arange(len(per_label)).float()
    ax.bar(x - 0.2, [m["ap"] for m in per_label], 0.4, label="AP")
    ax.bar(x + 0.2, [m["f1"] for m in per_label], 0.4, label="F1 at threshold")
    ax.set_xticks(x.tolist(), [f"{m['label']}\n({m['support']})" for m in per_label])
    ax.set_ylim(0, 1)
    ax.set_ylabel("test score")
    ax.legend(loc="lower right")
    return figure
