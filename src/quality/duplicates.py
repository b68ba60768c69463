"""Exact and near copies of images, within and across splits; a pair across train/val and test
is leakage. Exact: the same decoded pixels. Near: features' cosine similarity at least
`cosine`, or perceptual hashes at most `phash_bits` apart with cosine at least `phash_cosine`."""

from dataclasses import dataclass

import numpy as np
import torch

from src.quality.hashes import hamming_pairs


@dataclass
class CopyRules:
    """What counts as a near copy (measured defaults: docs/audit.md)."""

    cosine: float = 0.95
    phash_bits: int = 8
    phash_cosine: float = 0.85


def is_leak(split_a: str, split_b: str) -> bool:
    """A copy of a test image in train or val."""
    return (split_a == "test") != (split_b == "test")


def exact_pairs(digests: list[str]) -> dict[tuple[int, int], str]:
    """Each image with the same pixels as an earlier one, paired with the group's first: a group
    of g copies gives g - 1 pairs (O(n) by hashing)."""
    first: dict[str, int] = {}
    pairs = {}
    for i, digest in enumerate(digests):
        if digest in first:
            pairs[(first[digest], i)] = "exact"
        else:
            first.setdefault(digest, i)
    return pairs


def near_pairs(
    hashes: np.ndarray,
    sims: torch.Tensor,
    ids: torch.Tensor,
    cosine: torch.Tensor,
    rules: CopyRules,
) -> set[tuple[int, int]]:
    """Pairs (i < j) that are near copies: among each image's nearest neighbours (`sims`,
    `ids`), those at cosine >= rules.cosine; and pHash pairs confirmed by their cosine."""
    found = set()
    for i, j in (sims >= rules.cosine).nonzero().tolist():
        a, b = i, int(ids[i, j])
        found.add((min(a, b), max(a, b)))
    for a, b, _ in hamming_pairs(hashes, hashes, rules.phash_bits, same=True):
        if float(cosine(a, b)) >= rules.phash_cosine:
            found.add((a, b))
    return found


def find_copies(
    digests: list[str],
    hashes: np.ndarray,
    features: torch.Tensor,
    neighbours: tuple[torch.Tensor, torch.Tensor],
    splits: list[str],
    rules: CopyRules,
) -> list[tuple[int, int, str, float]]:
    """(a, b, kind, cosine) per copy pair, leaks first, then by cosine (highest first)."""
    unit = torch.nn.functional.normalize(features.float(), dim=1)

    def cosine(a: int, b: int) -> float:
        return float(unit[a] @ unit[b])

    pairs = exact_pairs(digests)
    for pair in near_pairs(hashes, *neighbours, cosine, rules):
        pairs.setdefault(pair, "near")
    rows = [(a, b, kind, cosine(a, b)) for (a, b), kind in pairs.items()]
    return sorted(rows, key=lambda r: (not is_leak(splits[r[0]], splits[r[1]]), -r[3], r[0], r[1]))
