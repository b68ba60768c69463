"""Multi-label linear probe: one L2-regularised logistic regression per label on fixed (cached)
features, all labels fitted together by one full-batch L-BFGS.

The objective is the sum over labels of each label's own (mean binary cross-entropy + penalty),
so the labels do not interact and the joint optimum is every label's own optimum: scikit-learn's
`LogisticRegression(C=1 / (l2 * n))` per label on the same standardised features. One strength
for all labels, chosen on the val split by mean average precision or loss, as `fit_probe`.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from src.frozen.probe import (
    DEFAULT_L2_GRID,
    check_grid,
    fold_standardisation,
    minimise,
    standardisation,
)
from src.model.metrics import mean_average_precision

SELECTIONS = ("loss", "mAP")


@dataclass
class LabelProbeFit:
    """A fitted per-label probe: a head for raw features, the chosen strength, the sweep."""

    weight: torch.Tensor  # (labels, features), float32, for raw features
    bias: torch.Tensor  # (labels,), float32
    l2: float
    grid: list[dict[str, float]]  # per strength, strongest first: l2, train_loss, val_loss, val_mAP


def label_objective(
    z: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, l2: float
) -> torch.Tensor:
    """Sum over labels of (mean BCE of sigmoid(z w_k + c_k) + 0.5 * l2 * ||w_k||^2)."""
    bce = F.binary_cross_entropy_with_logits(F.linear(z, weight, bias), y, reduction="none")
    return bce.mean(0).sum() + 0.5 * l2 * weight.square().sum()


def fit_labels(
    z: torch.Tensor,
    y: torch.Tensor,
    l2: float,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = 1000,
    tol: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise `label_objective` by L-BFGS (src.frozen.probe.minimise) from `init` or zeros."""

    def loss(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return label_objective(z, y, weight, bias, l2)

    return minimise(loss, (y.shape[1], z.shape[1]), z, init, max_iter, tol, l2)


def fit_label_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    l2_grid: list[float] | None = None,
    select: str = "loss",
    tol: float = 1e-5,
    refit_tol: float | None = 1e-8,
) -> LabelProbeFit:
    """Fit the per-label probe on features standardised by the training split's statistics,
    the strength chosen on val (`select`: lowest mean BCE or highest mAP; ties go to the
    stronger), each grid fit warm-started from the stronger one, the chosen one refitted to
    `refit_tol` (None: not refitted). `train_y`, `val_y`: (samples, labels) 0/1. A label
    without a positive or a negative training image has no finite optimum: a ValueError."""
    if select not in SELECTIONS:
        raise ValueError(f"select must be one of {SELECTIONS} for multi-label, got {select!r}")
    positives = train_y.sum(0)
    if bad := ((positives == 0) | (positives == len(train_y))).nonzero().flatten().tolist():
        raise ValueError(f"labels {bad} have no positive or no negative training image")
    grid = check_grid(DEFAULT_L2_GRID if l2_grid is None else l2_grid)
    mean, scale = standardisation(train_x)
    z_train, z_val = ((x.to(torch.float64) - mean) / scale for x in (train_x, val_x))
    y_train, y_val = train_y.to(torch.float64), val_y.to(torch.float64)
    records, solution, best, best_start = [], None, 0, None
    for i, l2 in enumerate(grid):
        start, solution = solution, fit_labels(z_train, y_train, l2, solution, tol=tol)
        val_logits = F.linear(z_val, *solution)
        point = {
            "l2": l2,
            "train_loss": F.binary_cross_entropy_with_logits(
                F.linear(z_train, *solution), y_train
            ).item(),
            "val_loss": F.binary_cross_entropy_with_logits(val_logits, y_val).item(),
            "val_mAP": mean_average_precision(val_logits.sigmoid(), y_val),
        }
        records.append(point)
        better = (
            point["val_loss"] < records[best]["val_loss"]
            if select == "loss"
            else point["val_mAP"] > records[best]["val_mAP"]
        )
        if i == 0 or better:
            best, best_start, best_solution = i, start, solution
    weight, bias = best_solution
    if refit_tol is not None:
        weight, bias = fit_labels(z_train, y_train, grid[best], best_start, tol=refit_tol)
    weight, bias = fold_standardisation(weight, bias, mean, scale)
    return LabelProbeFit(weight.float(), bias.float(), grid[best], records)
