"""Per-image fingerprints for copy detection: the sha256 of the decoded RGB pixels (exact copies,
whatever the file format) and a 16 x 16 greyscale thumbnail (near copies: resized, re-encoded,
recoloured; compared by correlation, which ignores brightness and contrast).

Computed in threads and kept in a JSON cache beside the scan cache (keyed by path, size and
mtime), so a training run's leak check after an audit, or a second run, decodes nothing."""

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

from src.data.images import usable_cores
from src.data.scan import scan_cache_file

log = logging.getLogger(__name__)
HASH_FORMAT = 2  # bump when either fingerprint changes
THUMB = 16  # thumbnail side


def thumbnail(image: Image.Image) -> bytes:
    """The 16 x 16 greyscale thumbnail (Lanczos): copies resized or re-encoded keep a correlation
    above 0.999 with it, distinct but similar images of the embedded data at most 0.987."""
    return image.convert("L").resize((THUMB, THUMB), Image.Resampling.LANCZOS).tobytes()


def fingerprint(path: Path) -> tuple[str, str]:
    """(sha256 of the decoded RGB pixels and size, thumbnail as hex) of one image file."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()
    return digest, thumbnail(rgb).hex()


def fingerprints(paths: list[Path], cache_file: Path | None) -> tuple[list[str], torch.Tensor]:
    """The pixel digests and thumbnails ((n, 256) floats, each centred on its mean) of `paths`,
    from `cache_file` where the file is unchanged, else computed (and the cache rewritten)."""
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
    thumbs = torch.tensor([list(bytes.fromhex(cache[key][1])) for key in keys]).float()
    return digests, thumbs - thumbs.mean(dim=1, keepdim=True)


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


def hash_cache_file(scan_cache: str | Path | None, root: Path) -> Path | None:
    """The fingerprint cache of the folder `root`, beside its scan cache (None without one)."""
    return scan_cache_file(scan_cache, root).with_suffix(".hashes.json") if scan_cache else None
