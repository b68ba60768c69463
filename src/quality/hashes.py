"""Per-image fingerprints for copy detection: the sha256 of the decoded RGB pixels (exact copies,
whatever the file format) and a 64-bit perceptual hash (near copies: resized, re-encoded).

Computed in threads and kept in a JSON cache beside the scan cache (keyed by path, size and
mtime), so a training run's leak check after an audit, or a second run, decodes nothing."""

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.fft import dctn

from src.data.images import usable_cores

log = logging.getLogger(__name__)
HASH_FORMAT = 1  # bump when either fingerprint changes


def phash(image: Image.Image) -> int:
    """pHash (Zauner 2010): the 8x8 lowest frequencies of the 32x32 greyscale image's DCT, each
    bit whether a coefficient is above their median (the DC term left out)."""
    grey = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), np.float64)
    low = dctn(grey, norm="ortho")[:8, :8].flatten()
    bits = low > np.median(low[1:])
    bits[0] = False
    return int(np.packbits(bits).view(">u8")[0])


def fingerprint(path: Path) -> tuple[str, int]:
    """(sha256 of the decoded RGB pixels and size, pHash) of one image file."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()
    return digest, phash(rgb)


def fingerprints(paths: list[Path], cache_file: Path | None) -> tuple[list[str], np.ndarray]:
    """The pixel digests and pHashes (uint64 array) of `paths`, from `cache_file` where the file
    is unchanged, else computed (and the cache rewritten)."""
    cache = read_cache(cache_file) if cache_file else {}
    keys = [f"{p}\t{p.stat().st_size}\t{p.stat().st_mtime_ns}" for p in paths]
    missing = [i for i, key in enumerate(keys) if key not in cache]
    if missing:
        with ThreadPoolExecutor(usable_cores()) as pool:
            for i, value in zip(
                missing, pool.map(fingerprint, [paths[m] for m in missing]), strict=True
            ):
                cache[keys[i]] = list(value)
        if cache_file:
            write_cache(cache_file, {key: cache[key] for key in keys})
    digests = [cache[key][0] for key in keys]
    hashes = np.array([cache[key][1] for key in keys], dtype=np.uint64)
    return digests, hashes


def read_cache(path: Path) -> dict[str, list]:
    """The cached fingerprints, or none when missing, of another format or unreadable (JSON)."""
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(cache, dict) or cache.get("format") != HASH_FORMAT:
        return {}
    return cache.get("images", {}) if isinstance(cache.get("images"), dict) else {}


def write_cache(path: Path, images: dict[str, list]) -> None:
    """Write the cache atomically; one that cannot be written is only a warning."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"format": HASH_FORMAT, "images": images}))
        os.replace(partial, path)
    except OSError as err:
        log.warning("cannot write the fingerprint cache %s: %s", path, err)
        partial.unlink(missing_ok=True)


def hamming_pairs(
    a: np.ndarray, b: np.ndarray, within: int, same: bool = False, block: int = 1024
) -> list[tuple[int, int, int]]:
    """(i, j, distance) for pHashes a[i], b[j] at most `within` bits apart (i < j when `same`,
    a and b the same array). All pairs, in blocks of `block` rows: O(len(a) * len(b)) time,
    O(block * len(b)) memory (30,000 x 30,000 takes seconds)."""
    pairs = []
    for start in range(0, len(a), block):
        dist = np.bitwise_count(a[start : start + block, None] ^ b[None, :])
        rows, cols = np.nonzero(dist <= within)
        for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
            if not same or start + i < j:
                pairs.append((start + i, j, int(dist[i, j])))
    return pairs
