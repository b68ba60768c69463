"""Scores of "none of these": how unlike the training images an image is, higher = more unknown.

`knn` (the default) is the cosine distance from an image's L2-normalised pooled feature to its
k-th nearest training feature (Sun et al., ICML 2022); `msp` (one minus the top calibrated
probability) and `energy` (minus T * logsumexp(logits / T)) need only the logits. The threshold
keeps a stated share of the val split; what the score needs is `ood_record`'s dict, stored in
the checkpoint.
"""

import math
from typing import Any

import torch
import torch.nn.functional as F

SCORES = ("knn", "msp", "energy")
CHUNK = 4096  # query rows per similarity matrix: memory stays near CHUNK x bank rows


def normalised(features: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, in float32."""
    return F.normalize(features.float(), dim=1)


def subsample(features: torch.Tensor, limit: int | None, seed: int = 0) -> torch.Tensor:
    """At most `limit` rows, drawn without replacement (seeded); all rows when `limit` is None
    or not exceeded. Keeps the checkpoint small where the training set is large."""
    if limit is None or len(features) <= limit:
        return features
    keep = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))[:limit]
    return features[keep.sort().values]


def knn_distance(features: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Cosine distance (1 - similarity) of each row of `features` to its k-th nearest row of the
    L2-normalised `bank` (k capped at the bank's size)."""
    k = min(k, len(bank))
    bank = bank.float()
    rows = [
        1 - (normalised(part) @ bank.T).topk(k, dim=1).values[:, -1]
        for part in features.split(CHUNK)
    ]
    return torch.cat(rows) if rows else torch.empty(0)


def scores(
    kind: str,
    logits: torch.Tensor,
    temperature: float = 1.0,
    features: torch.Tensor | None = None,
    bank: torch.Tensor | None = None,
    k: int = 5,
) -> torch.Tensor:
    """The `kind` score of each image (higher: less like the training images)."""
    if kind == "msp":
        return 1 - (logits / temperature).softmax(1).max(1).values
    if kind == "energy":
        return -temperature * torch.logsumexp(logits / temperature, dim=1)
    if kind == "knn":
        return knn_distance(features, bank, k)
    raise ValueError(f"unknown OOD score {kind!r}; one of {SCORES}")


def threshold(val_scores: torch.Tensor, coverage: float) -> float:
    """The smallest score at or below which `coverage` of the val images lie: images scoring
    above it are `unknown`, so at least ceil(coverage * n) val images are kept."""
    ordered = val_scores.float().sort().values
    if len(ordered) == 0:
        return math.inf
    keep = min(len(ordered), max(1, math.ceil(coverage * len(ordered) - 1e-9)))
    return float(ordered[keep - 1])


def feature_bank(train_features: torch.Tensor, max_features: int | None) -> torch.Tensor:
    """The training features the knn score compares with: subsampled to `max_features` rows,
    L2-normalised, in float16 (half the bytes; cosine distances move by about 1e-3)."""
    return normalised(subsample(train_features, max_features)).half()


def ood_record(
    kind: str, k: int, coverage: float, val_scores: torch.Tensor, bank: torch.Tensor | None
) -> dict[str, Any]:
    """What a checkpoint stores for the score: its kind, k, the val scores (sorted, so another
    coverage can be chosen at predict time), the threshold at `coverage` and, for knn, the
    `feature_bank`."""
    record: dict[str, Any] = {
        "score": kind,
        "k": k,
        "coverage": coverage,
        "threshold": threshold(val_scores, coverage),
        "val_scores": val_scores.float().sort().values,
    }
    if bank is not None:
        record["features"] = bank
    return record


def unknown(
    record: dict[str, Any],
    logits: torch.Tensor,
    features: torch.Tensor | None,
    temperature: float,
    coverage: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per image, the stored score and whether it is `unknown`, with the threshold used: the
    stored one, or the one keeping `coverage` of the val split."""
    score = scores(
        record["score"], logits, temperature, features, record.get("features"), record["k"]
    )
    cut = record["threshold"] if coverage is None else threshold(record["val_scores"], coverage)
    return score, score > cut, cut
