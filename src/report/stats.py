"""Small exact statistics for comparing runs: binomial and t intervals, paired seed differences.

A test accuracy measured on n images is a binomial proportion (Wilson interval); a metric's
spread over seeds or folds is summarised by a t interval of its mean. scipy is imported only
by the functions that need it, so importing this module stays cheap.
"""

import math
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

import numpy as np

Z95 = 1.959964  # the standard normal's 97.5% quantile: a two-sided 95% interval


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of `correct` successes in `n` trials (95% by default).

    Unlike the normal approximation p ± z·sqrt(p(1-p)/n) it stays inside [0, 1] and does not
    shrink to a point at 0/n or n/n, which small test sets often reach.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 <= correct <= n:
        raise ValueError(f"correct must be between 0 and n={n}, got {correct}")
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo = 0.0 if correct == 0 else max(0.0, centre - half)  # exact at the ends, which rounding
    hi = 1.0 if correct == n else min(1.0, centre + half)  # would leave a few 1e-17 off
    return lo, hi


def accuracy_ci(acc: float, n: int) -> tuple[float, float]:
    """The Wilson 95% interval of an accuracy `acc` measured on `n` samples."""
    return wilson_interval(round(acc * n), n)


def describe(values: Iterable[float]) -> dict[str, Any]:
    """n, mean, sample std (ddof=1), min and max; nan where undefined (std of 1, all of 0).

    A nan or inf value propagates to the statistics instead of being dropped, so a seed that
    diverged shows in its setting's summary.
    """
    array = np.asarray(list(values), dtype=float)
    n = len(array)
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan}
    std = float(np.std(array, ddof=1)) if n > 1 else math.nan
    return {
        "n": n,
        "mean": float(np.mean(array)),
        "std": std,
        "min": float(np.min(array)),
        "max": float(np.max(array)),
    }


def mean_interval(values: Iterable[float]) -> tuple[float, float, float]:
    """The mean and its t-based 95% interval, (mean, lo, hi); (v, nan, nan) for one value."""
    stats = describe(values)
    n = stats["n"]
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    if n == 1:
        return stats["mean"], math.nan, math.nan
    from scipy.stats import t  # here, not at the top: scipy.stats takes ~0.5 s to import

    half = float(t.ppf(0.975, n - 1)) * stats["std"] / math.sqrt(n)
    return stats["mean"], stats["mean"] - half, stats["mean"] + half


def paired_difference(a: Mapping[Hashable, float], b: Mapping[Hashable, float]) -> dict[str, Any]:
    """The mean of a - b over the seeds both have, with its t 95% interval (a paired t test).

    Pairing by seed removes what the two settings share on a seed (its data order and head
    initialisation), so the interval is narrower than comparing two independent means.
    Returns n, mean, lo, hi; mean is nan for n = 0, lo and hi for n < 2.
    """
    differences = [a[seed] - b[seed] for seed in a if seed in b]
    if not differences:
        return {"n": 0, "mean": math.nan, "lo": math.nan, "hi": math.nan}
    mean, lo, hi = mean_interval(differences)
    return {"n": len(differences), "mean": mean, "lo": lo, "hi": hi}
