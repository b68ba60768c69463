"""Exact and near copies of images, within and across splits; a pair across train/val and test
is leakage. Exact: the same decoded pixels. Near: 16 x 16 greyscale thumbnails correlated at
least `pixels` (resized, re-encoded, recoloured), or features' cosine similarity at least
`cosine` (cropped, shifted)."""

from dataclasses import dataclass

import torch

from src.quality.neighbours import nearest


@dataclass
class CopyRules:
    """What counts as a near copy (measured defaults: docs/audit.md)."""

    pixels: float = 0.995
    cosine: float = 0.95
    neighbours: int = 5  # candidates per image: a group of more copies is listed in part


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
            first[digest] = i
    return pairs


def close_pairs(sims: torch.Tensor, ids: torch.Tensor, least: float) -> set[tuple[int, int]]:
    """Pairs (i < j) among the nearest neighbours (`sims`, `ids`) at similarity >= `least`."""
    rows, cols = (sims >= least).nonzero(as_tuple=True)
    return {
        (min(a, b), max(a, b)) for a, b in zip(rows.tolist(), ids[rows, cols].tolist(), strict=True)
    }


def find_copies(
    digests: list[str],
    thumbs: torch.Tensor,
    neighbours: tuple[torch.Tensor, torch.Tensor],
    splits: list[str],
    rules: CopyRules,
) -> list[tuple[int, int, str, float]]:
    """(a, b, kind, thumbnail correlation) per copy pair, leaks first, then most alike first.
    `neighbours`: the features' nearest neighbours (src.quality.neighbours.nearest)."""
    by_pixels = nearest(thumbs, rules.neighbours)
    pairs = exact_pairs(digests)
    for pair in close_pairs(*by_pixels, rules.pixels) | close_pairs(*neighbours, rules.cosine):
        pairs.setdefault(pair, "near")
    unit = torch.nn.functional.normalize(thumbs, dim=1)
    rows = [(a, b, kind, float(unit[a] @ unit[b])) for (a, b), kind in pairs.items()]
    return sorted(rows, key=lambda r: (not is_leak(splits[r[0]], splits[r[1]]), -r[3], r[0], r[1]))
