"""Calibrated probabilities: one temperature fitted on held-out logits (Guo et al., ICML 2017),
the expected calibration error and the reliability diagram that show whether it helped."""

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

ECE_BINS = 15
MAX_TEMPERATURE = 20.0
CHECK_FOLDS = 5  # `checked_temperature`


def finite_rows(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows whose logits and label are all finite, as float64 logits and long labels."""
    keep = torch.isfinite(logits).all(1) & torch.isfinite(labels.float())
    return logits[keep].double(), labels[keep].long()


def held_out_folds(n: int, folds: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(held-out rows, the other rows) of each of `folds` (at most `n`) folds of `n` rows,
    dealt from one fixed shuffle: the same folds on every call."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    for fold in range(min(folds, n)):
        out = order[fold::folds]
        yield out, order[torch.isin(order, out, invert=True)]


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T > 0 that minimises the NLL of softmax(logits / T) on these (val) logits.

    One parameter, fitted as log T by L-BFGS: it rescales confidence without changing any
    prediction. Rows with a non-finite logit or label are left out. T stays within
    [1/MAX_TEMPERATURE, MAX_TEMPERATURE]: on a few val images that the model gets wrong the
    optimum runs off to infinity (uniform probabilities), which says nothing useful.
    """
    logits, labels = finite_rows(logits, labels)
    if len(labels) == 0:
        return 1.0
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(1 / MAX_TEMPERATURE, MAX_TEMPERATURE))


def checked_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """`fit_temperature` on all these (val) logits where a temperature fitted without each of
    `CHECK_FOLDS` folds lowers the NLL of that fold, summed over the folds, below T = 1's; else 1.

    A model that is calibrated already (a probe's strength is chosen on val loss) gets a fitted
    T near 1 that only follows the noise of a small val split: out-of-fold it does not lower
    the NLL, and keeping T = 1 leaves the probabilities as good as they were."""
    logits, labels = finite_rows(logits, labels)
    if len(labels) < 2 * CHECK_FOLDS:
        return 1.0
    fitted = plain = 0.0
    for out, rest in held_out_folds(len(labels), CHECK_FOLDS):
        temperature = fit_temperature(logits[rest], labels[rest])
        fitted += float(F.cross_entropy(logits[out] / temperature, labels[out], reduction="sum"))
        plain += float(F.cross_entropy(logits[out], labels[out], reduction="sum"))
    return fit_temperature(logits, labels) if fitted < plain else 1.0


def reliability(
    probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS
) -> list[tuple[float, float, int]]:
    """Per equal-width confidence bin: (mean confidence, accuracy, images); empty bins skipped."""
    confidence, predicted = probs.max(1)
    right = (predicted == labels).double()
    index = (confidence.double() * bins).ceil().clamp(1, bins).long() - 1  # (k/b, (k+1)/b]
    rows = []
    for b in range(bins):
        members = index == b
        if members.any():
            rows.append(
                (
                    float(confidence[members].double().mean()),
                    float(right[members].mean()),
                    int(members.sum()),
                )
            )
    return rows


def expected_calibration_error(
    probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS
) -> float:
    """ECE: the image-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    total = len(labels)
    return sum(n / total * abs(acc - conf) for conf, acc, n in reliability(probs, labels, bins))


def reliability_figure(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, bins: int = ECE_BINS
) -> Figure:
    """Accuracy against confidence per bin, before (T = 1) and after the temperature."""
    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="calibrated")
    for t, marker in ((1.0, "o"), (temperature, "s")):
        probs = (logits / t).softmax(1)
        rows = reliability(probs, labels, bins)
        ece = expected_calibration_error(probs, labels, bins)
        ax.plot(
            [r[0] for r in rows],
            [r[1] for r in rows],
            marker=marker,
            label=f"T={t:.3g}: ECE {ece:.3f}",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability diagram ({len(labels)} images, {bins} bins)")
    ax.legend(loc="upper left")
    return fig
