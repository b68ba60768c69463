"""Images unlike every other: the mean cosine distance to their k nearest neighbours in the
feature space, listed when far above the typical distance (a robust z-score)."""

import torch


def outlier_scores(sims: torch.Tensor) -> torch.Tensor:
    """Per image, 1 - the mean cosine similarity to its nearest neighbours (`sims`, (n, k))."""
    return 1 - sims.mean(dim=1)


def robust_z(scores: torch.Tensor) -> torch.Tensor:
    """(score - median) / (1.4826 * median absolute deviation): about a z-score on the bulk,
    not pulled by the outliers themselves."""
    median = scores.median()
    mad = (scores - median).abs().median().clamp_min(1e-12)
    return (scores - median) / (1.4826 * mad)


def outliers(sims: torch.Tensor, min_z: float) -> list[tuple[int, float, float]]:
    """(index, score, z) of the images with robust z >= `min_z`, most outlying first."""
    scores = outlier_scores(sims)
    z = robust_z(scores)
    order = torch.argsort(scores, descending=True).tolist()
    return [(i, float(scores[i]), float(z[i])) for i in order if z[i] >= min_z]
