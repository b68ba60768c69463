"""The training run's cheap leak check: test images with an exact or near copy (by pixels and
thumbnails, no features) in train or val, warned in one line."""

import logging
from pathlib import Path
from typing import Any

import torch

from src.quality.duplicates import CopyRules
from src.quality.hashes import fingerprints, hash_cache_file

log = logging.getLogger(__name__)


def leaked(digests: list[str], thumbs: torch.Tensor, test: torch.Tensor, least: float) -> int:
    """How many test images (the `test` mask) have the same pixels as, or a thumbnail correlated
    at least `least` with, a train or val image. Test rows against the others, in blocks:
    O(test x others) time, O(block x others) memory."""
    unit = torch.nn.functional.normalize(thumbs, dim=1)
    others = unit[~test]
    seen = {d for d, t in zip(digests, test.tolist(), strict=True) if not t}
    rows = test.nonzero().flatten().tolist()
    count = 0
    for start in range(0, len(rows), 1024):
        block = rows[start : start + 1024]
        near = (unit[block] @ others.T).amax(dim=1) >= least if len(others) else None
        for n, i in enumerate(block):
            count += digests[i] in seen or (near is not None and bool(near[n]))
    return count


def warn_if_leaks(data: Any, scan_cache: str | Path | None) -> int:
    """Warn when the test split shares exact or near copies with train or val; the count."""
    if data.test_is_val:
        return 0
    splits = data.splits()
    paths = splits["train"].paths + splits["val"].paths + splits["test"].paths
    test = torch.zeros(len(paths), dtype=torch.bool)
    test[len(paths) - len(splits["test"].paths) :] = True
    digests, thumbs = fingerprints(paths, hash_cache_file(scan_cache, data.root))
    count = leaked(digests, thumbs, test, CopyRules().pixels)
    if count:
        log.warning(
            "%d test image(s) have an exact or near copy in train or val: the test accuracy is "
            "optimistic. Fix: python -m src.audit data.root=%s (duplicates.csv lists them), "
            "then data.exclude=<file> or remove the copies",
            count,
            data.root,
        )
    return count
