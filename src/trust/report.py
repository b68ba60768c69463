"""What src.eval reports of calibration and "unknown": ECE before and after the temperature,
selective accuracy on the images kept, the risk-coverage curve and their figures."""

from typing import Any

import torch
from matplotlib.figure import Figure

from src.trust.calibration import expected_calibration_error, reliability_figure
from src.trust.predictions import Trusted

CURVE_POINTS = 20


def risk_coverage(score: torch.Tensor, wrong: torch.Tensor) -> list[tuple[float, float]]:
    """(coverage, error rate on the kept images) when keeping the images of lowest score first,
    at `CURVE_POINTS` evenly spaced coverages."""
    ordered = wrong[score.argsort(stable=True)].double()
    errors = ordered.cumsum(0)
    n = len(ordered)
    points = []
    for step in range(1, CURVE_POINTS + 1):
        kept = max(1, round(step / CURVE_POINTS * n))
        points.append((kept / n, float(errors[kept - 1] / kept)))
    return points


def trust_metrics(out: Trusted, labels: torch.Tensor) -> dict[str, Any]:
    """ECE at T = 1 and at the checkpoint's temperature; with OOD data, the share of images kept
    (not `unknown`), the accuracy on them, and the risk-coverage curve of the OOD score (else of
    one minus the top probability)."""
    wrong = out.probs.argmax(1) != labels
    metrics: dict[str, Any] = {
        "temperature": out.temperature,
        "test_ece_before_calibration": expected_calibration_error(out.logits.softmax(1), labels),
        "test_ece_after_calibration": expected_calibration_error(out.probs, labels),
    }
    score = 1 - out.probs.max(1).values if out.score is None else out.score
    if out.unknown is not None:
        kept = ~out.unknown
        metrics["share_kept"] = float(kept.double().mean())
        metrics["accuracy_kept"] = float((~wrong[kept]).double().mean()) if kept.any() else None
        metrics["unknown_threshold"] = out.threshold
    metrics["risk_coverage"] = [{"coverage": c, "risk": r} for c, r in risk_coverage(score, wrong)]
    return metrics


def risk_coverage_figure(metrics: dict[str, Any]) -> Figure:
    """Error rate on the kept images against the share kept."""
    fig = Figure(figsize=(5, 4), layout="constrained")
    ax = fig.add_subplot()
    curve = metrics["risk_coverage"]
    ax.plot([p["coverage"] for p in curve], [p["risk"] for p in curve], marker=".")
    if "share_kept" in metrics:
        ax.axvline(metrics["share_kept"], color="grey", linestyle="--", label="threshold")
        ax.legend()
    ax.set_xlabel("coverage (share of images kept)")
    ax.set_ylabel("risk (error rate on kept images)")
    ax.set_title("Risk-coverage curve")
    return fig


def trust_figures(out: Trusted, labels: torch.Tensor, metrics: dict[str, Any]) -> dict[str, Figure]:
    """The reliability diagram and the risk-coverage curve, by file stem."""
    return {
        "reliability": reliability_figure(out.logits, labels, out.temperature),
        "risk_coverage": risk_coverage_figure(metrics),
    }


def trust_lines(metrics: dict[str, Any]) -> list[str]:
    """Markdown lines for the report."""
    lines = [
        f"- calibration: temperature {metrics['temperature']:.3g}, test ECE (15 bins) "
        f"{metrics['test_ece_before_calibration']:.4f} before, "
        f"{metrics['test_ece_after_calibration']:.4f} after",
    ]
    if "share_kept" in metrics:
        accuracy = metrics["accuracy_kept"]
        lines.append(
            f"- unknown: {metrics['share_kept']:.1%} of the images kept, accuracy on them "
            + (f"{accuracy:.4f}" if accuracy is not None else "n/a")
        )
    return lines + [
        "",
        "![reliability diagram](reliability.png)",
        "",
        "![risk-coverage](risk_coverage.png)",
    ]
