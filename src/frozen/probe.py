"""Linear probe: L2-regularised multinomial logistic regression on fixed (cached) features.

The protocol of CLIP (Radford et al. 2021, appendix A.3): full-batch L-BFGS logistic regression,
the L2 strength swept over a log-spaced grid and chosen on the validation split (never the test
split), then refitted at the chosen strength. The result is a (weight, bias) pair for a
`torch.nn.Linear(num_features, num_classes)` head on raw features.
"""

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# 10 values, 1e-6 ... 1e0 (a factor of about 4.6 apart). The objective is a per-sample mean on
# standardised features, so l2 does not depend on the feature scale. At l2 = 1 the penalty
# dominates (the zero-weight head costs at most ln K, so ||V|| <= sqrt(2 ln K / l2), a nearly
# constant predictor); at l2 = 1e-6 it is negligible next to the data term even for ~1e5 samples
# (scikit-learn C = 10 there), i.e. nearly unregularised. The validation loss is smooth in log l2,
# so ~1.5 points per decade find its basin at the cost of 10 warm-started fits (CLIP searched
# more finely, over a wider range, per benchmark).
DEFAULT_L2_GRID = tuple(torch.logspace(-6, 0, 10, dtype=torch.float64).tolist())
SELECTIONS = ("loss", "acc")


@dataclass
class ProbeFit:
    """A fitted probe: a head for raw features, the chosen strength and the sweep record."""

    weight: torch.Tensor  # (classes, features), float32, for raw (unstandardised) features
    bias: torch.Tensor  # (classes,), float32
    l2: float  # the chosen strength
    grid: list[dict[str, float]]  # per grid value, in fitting order (strongest first):
    # {"l2", "train_loss", "val_loss", "val_acc"}; losses are mean cross-entropies, no penalty


def standardisation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and population std (ddof 0, as StandardScaler) of `x`, float64.

    A constant feature (std within rounding of zero) gets an infinite scale: it standardises to
    exactly 0, so it receives no gradient, keeps a zero weight, and folds back to weight 0.
    """
    x = x.to(torch.float64)
    mean = x.mean(dim=0)
    std = x.std(dim=0, correction=0)
    return mean, std.masked_fill(std <= 1e-10 * mean.abs(), float("inf"))


def fold_standardisation(
    weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The head on raw x equal to (weight, bias) on z = (x - mean) / scale.

    z V^T + c = x (V / scale)^T + (c - (V / scale) mean).
    """
    raw_weight = weight / scale
    return raw_weight, bias - raw_weight @ mean


def objective(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, l2: float
) -> torch.Tensor:
    """Mean cross-entropy of softmax(x W^T + b) + 0.5 * l2 * ||W||_F^2 (bias not penalised)."""
    return F.cross_entropy(F.linear(x, weight, bias), y) + 0.5 * l2 * weight.square().sum()


def minimise(
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape: tuple[int, int],
    like: torch.Tensor,
    init: tuple[torch.Tensor, torch.Tensor] | None,
    max_iter: int,
    tol: float,
    l2: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise `loss(W, b)` over a (W, b) of `shape` (outputs, features) by full-batch L-BFGS.

    float64 like `like`, strong-Wolfe line search, from `init` (a (W, b) warm start, not
    modified) or zeros. Stops when the largest gradient entry is <= `tol` (or progress stalls
    below tol**2); warns if `max_iter` iterations (or 2 * max_iter evaluations) run out first.
    """
    if init is None:
        weight, bias = like.new_zeros(shape), like.new_zeros(shape[0])
    else:
        weight, bias = (t.detach().to(like).clone() for t in init)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    max_eval = 2 * max_iter
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        max_iter=max_iter,
        max_eval=max_eval,
        tolerance_grad=tol,
        tolerance_change=tol**2,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = loss(weight, bias)
        value.backward()
        return value

    optimizer.step(closure)
    state = optimizer.state_dict()["state"][0]
    if state["n_iter"] >= max_iter or state["func_evals"] >= max_eval:
        warnings.warn(
            f"L-BFGS at l2={l2:g} ran out of iterations before the gradient reached {tol:g}; "
            "raise max_iter",
            RuntimeWarning,
            stacklevel=3,
        )
    return weight.detach(), bias.detach()


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    l2: float,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = 1000,
    tol: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise `objective` over (W, b) on the features as given (`minimise`); float64 (W, b)."""
    x, y = x.to(torch.float64), y.long()

    def loss(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return objective(x, y, weight, bias, l2)

    return minimise(loss, (num_classes, x.shape[1]), x, init, max_iter, tol, l2)


def fit_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    l2_grid: list[float] | None = None,
    select: str = "loss",
    max_iter: int = 1000,
    tol: float = 1e-5,
    refit_tol: float | None = 1e-8,
) -> ProbeFit:
    """Fit a linear probe, choosing the L2 strength on the validation split.

    Objective at strength l2, with z = (x - mu) / sigma standardised by the TRAINING features'
    per-feature mean mu and population std sigma (constant features: weight 0):

        L(V, c) = (1/n) sum_i CE(softmax(V z_i + c), y_i) + (l2 / 2) ||V||_F^2,

    n the number of training samples, c (the bias) not penalised. The penalty applies to the
    standardised weights V, as `make_pipeline(StandardScaler(), LogisticRegression(C=C))` does:
    scikit-learn minimises C * sum_i CE + ||V||^2 / 2, which is n * C times L when
    C = 1 / (l2 * n). (The same mapping holds for the unstandardised objective, with raw features
    in place of z.) Standardising conditions the problem and makes l2 independent of the feature
    scale; the head returned for raw x is W = V / sigma, b = c - W mu (so x W^T + b = V z + c),
    whose raw-space penalty is (l2 / 2) sum_kj sigma_j^2 W_kj^2.

    The grid (`DEFAULT_L2_GRID` if None) is fitted from the strongest to the weakest strength,
    each fit warm-started from the previous solution: the strongest problem is well conditioned
    and its optimum is near the zero start, and the weak ones, slow from scratch, start next to
    a neighbouring optimum. Sweep fits stop at gradient `tol` (enough to rank strengths); the
    chosen one is then refitted to `refit_tol` from the start its sweep fit had (None: not
    refitted, for a caller that refits on other data anyway).

    `select="loss"` picks the lowest validation cross-entropy, `"acc"` the highest validation
    accuracy; ties go to the stronger regularisation. Test data never enters this function.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    _check_split("train", train_x, train_y, num_classes)
    _check_split("val", val_x, val_y, num_classes)
    if val_x.shape[1] != train_x.shape[1]:
        raise ValueError(f"val_x has {val_x.shape[1]} features but train_x has {train_x.shape[1]}")
    missing = (train_y.bincount(minlength=num_classes) == 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(
            f"classes {missing} have no training sample: their unpenalised bias has no finite "
            "optimum"
        )
    grid = check_grid(DEFAULT_L2_GRID if l2_grid is None else l2_grid)
    if select not in SELECTIONS:
        raise ValueError(f"select must be one of {SELECTIONS}, got {select!r}")
    if max_iter < 1 or tol <= 0 or (refit_tol is not None and refit_tol <= 0):
        raise ValueError(
            f"max_iter must be >= 1 and tolerances > 0, got {max_iter}, {tol}, {refit_tol}"
        )

    mean, scale = standardisation(train_x)
    z_train, z_val = ((x.to(torch.float64) - mean) / scale for x in (train_x, val_x))
    y_train, y_val = train_y.long(), val_y.long()
    records: list[dict[str, float]] = []
    solution = best_start = None
    best = 0
    for i, l2 in enumerate(grid):
        start, solution = (
            solution,
            fit_logistic(z_train, y_train, num_classes, l2, solution, max_iter, tol),
        )
        train_loss, _ = _evaluate(z_train, y_train, *solution)
        val_loss, val_acc = _evaluate(z_val, y_val, *solution)
        records.append(
            {"l2": l2, "train_loss": train_loss, "val_loss": val_loss, "val_acc": val_acc}
        )
        better = (
            val_loss < records[best]["val_loss"]
            if select == "loss"
            else val_acc > records[best]["val_acc"]
        )
        if i == 0 or better:
            best, best_start, best_solution = i, start, solution

    weight, bias = best_solution
    if refit_tol is not None:  # from the sweep's start: L-BFGS restarted next to its optimum,
        # with no curvature history, crawled (2 s instead of 0.1 s on 750 x 1280 features)
        weight, bias = fit_logistic(
            z_train, y_train, num_classes, grid[best], best_start, max_iter, refit_tol
        )
    weight, bias = fold_standardisation(weight, bias, mean, scale)
    return ProbeFit(weight.float(), bias.float(), grid[best], records)


def _evaluate(
    z: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[float, float]:
    """Mean cross-entropy (no penalty) and accuracy of the head on standardised features."""
    logits = F.linear(z, weight, bias)
    return F.cross_entropy(logits, y).item(), (logits.argmax(dim=1) == y).double().mean().item()


def _check_split(name: str, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> None:
    """Raise ValueError unless x is (n >= 1, d >= 1) finite floats and y n labels in range."""
    if x.ndim != 2 or not torch.is_floating_point(x):
        raise ValueError(
            f"{name}_x must be a 2-D float tensor (samples, features), got {x.dtype} "
            f"of shape {tuple(x.shape)}"
        )
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} split is empty: {name}_x has shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}_x has non-finite values")
    if y.ndim != 1 or y.dtype == torch.bool or torch.is_floating_point(y) or y.is_complex():
        raise ValueError(
            f"{name}_y must be a 1-D integer tensor, got {y.dtype} of shape {tuple(y.shape)}"
        )
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{name}_y has {y.shape[0]} labels for {x.shape[0]} samples")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(
            f"{name}_y labels must be in [0, {num_classes}), got {y.min().item()} .. "
            f"{y.max().item()}"
        )


def check_grid(l2_grid: list[float] | tuple[float, ...]) -> list[float]:
    """The grid as floats, strongest first; ValueError if empty, duplicated or not all > 0."""
    grid = sorted((float(v) for v in l2_grid), reverse=True)
    if not grid:
        raise ValueError("l2_grid is empty")
    if not all(0 < v < float("inf") for v in grid):
        raise ValueError(f"l2_grid values must be finite and > 0, got {grid}")
    if len(set(grid)) != len(grid):
        raise ValueError(f"l2_grid has duplicate values: {grid}")
    return grid
