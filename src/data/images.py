"""Image files: finding them, checking them once (with a scan cache) and decoding them, in
threads or DataLoader workers. Plain torch and PIL, for every command."""

import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import PIL
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2.functional import pil_to_tensor
from tqdm import tqdm

from src.errors import UserError

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
JUNK_FILES = {"thumbs.db", "desktop.ini"}  # and every hidden file (.DS_Store, macOS's ._x.jpg)
MAX_LISTED = 20  # bad images named in one message
MIN_SIDE = 8  # images smaller than this (px) are used, with a warning
PROGRESS_MIN = 2000  # images from which a progress bar is shown (on a terminal)
SCAN_FORMAT = 1  # bump when check_image changes what it accepts
T = TypeVar("T")
R = TypeVar("R")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's, taskset's or SLURM's
    share), not os.cpu_count(), which counts the whole machine."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def worker_start(workers: int) -> str | None:
    """DataLoader workers' start method: fork where the platform has it, as Linux's default.

    In a process started by spawn (a ddp_spawn rank, a loky job) the default is the parent's:
    spawn, whose workers import torch and this package again (about 10 s a loader on 2 cores)
    and must pickle the dataset's functions by value, which fails in a loky job.
    """
    return "fork" if workers and "fork" in multiprocessing.get_all_start_methods() else None


def progress(items: Any, total: int, what: str) -> Any:
    """`items` with a progress bar on a terminal when there are PROGRESS_MIN or more."""
    return tqdm(
        items, total=total, desc=what, unit="img", disable=None if total >= PROGRESS_MIN else True
    )


def parallel_map(fn: Callable[[T], R], items: Sequence[T], what: str) -> list[R]:
    """`fn` of each item, in order, in threads on the usable cores (PIL decodes without the GIL)."""
    with ThreadPoolExecutor(usable_cores()) as pool:
        return list(progress(pool.map(fn, items), len(items), what))


def ignored(path: Path) -> bool:
    """Hidden files and the junk that file managers leave (.DS_Store, Thumbs.db, desktop.ini)."""
    return path.name.startswith(".") or path.name.lower() in JUNK_FILES


def is_image(path: Path) -> bool:
    """An image file by its extension, in any letter case."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file() and not ignored(path)


def list_folder(folder: Path) -> tuple[list[tuple[Path, int, int]], list[Path]]:
    """The image files directly in `folder` as sorted (path, size, mtime_ns), and what else it
    holds besides hidden files and junk (to warn about): one directory read and a stat per file."""
    images, others = [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            path = Path(entry.path)
            if ignored(path):
                continue
            if entry.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                stat = entry.stat()
                images.append((path, stat.st_size, stat.st_mtime_ns))
            else:
                others.append(path)
    return sorted(images), sorted(others)


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted."""
    return [path for path, _, _ in list_folder(folder)[0]]


def class_folders(root: Path) -> list[str]:
    """Class names: the sub-folders of `root`, sorted."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not ignored(p))


def check_image(path: Path) -> tuple[int, int]:
    """The (width, height) of the image in `path`; raises if it cannot be decoded.

    Fast: reading the header rejects non-images and decompression bombs (PIL's
    DecompressionBombError), PNG checksums are verified without decompressing, JPEG is decoded
    at 1/8 scale and the other formats fully, which finds truncated files.
    """
    with Image.open(path) as image:
        size = image.size
        if image.format == "PNG":
            image.verify()
        else:
            image.draft(None, (1, 1))  # JPEG decodes at 1/8 scale, other formats ignore it
            image.load()
    return size


def problem(path: Path, err: Exception) -> str:
    """A short reason why `path` could not be read as an image."""
    if isinstance(err, UnidentifiedImageError):
        return "empty file" if path.stat().st_size == 0 else "not an image"
    return str(err) or type(err).__name__


def image_problem(path: Path) -> str | tuple[int, int]:
    """Why `path` cannot be used as an image, or its (width, height) when it can."""
    try:
        return check_image(path)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        return problem(path, err)


def scan_cache_file(cache_dir: str | Path, root: Path) -> Path:
    """The scan cache of the folder `root` in `cache_dir`: one JSON file per folder."""
    return Path(cache_dir) / f"{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]}.json"


def scan_header() -> dict[str, Any]:
    """What the cached results depend on besides the files: the checker, Pillow and its limit."""
    return {
        "format": SCAN_FORMAT,
        "pillow": PIL.__version__,
        "max_image_pixels": Image.MAX_IMAGE_PIXELS,
    }


def read_scan_cache(path: Path) -> dict[str, Any]:
    """The cached entries {relative path: [size, mtime_ns, [width, height]]} of `path`; empty if
    it is missing, of another checker, or unreadable (JSON: the file is data, never code)."""
    try:
        cache = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:  # ValueError: bad JSON or UTF-8
        log.warning("ignoring the unreadable scan cache %s (%s); it is rewritten", path, err)
        return {}
    if not isinstance(cache, dict) or not isinstance(cache.get("images"), dict):
        log.warning("ignoring the malformed scan cache %s; it is rewritten", path)
        return {}
    return cache["images"] if cache.get("header") == scan_header() else {}


def write_scan_cache(path: Path, images: dict[str, Any]) -> None:
    """Write the scan cache atomically (a temporary file renamed over it): a concurrent run reads
    the old file or the new one, never a part. A cache that cannot be written is only a warning."""
    partial_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial_path.write_text(json.dumps({"header": scan_header(), "images": images}))
        os.replace(partial_path, path)
    except OSError as err:
        log.warning("cannot write the scan cache %s: %s", path, err)
        partial_path.unlink(missing_ok=True)


def cached_size(entry: Any, size: int, mtime_ns: int) -> tuple[int, int] | None:
    """The (width, height) of a cache entry when it is well formed and of the same file version."""
    if not (isinstance(entry, list) and len(entry) == 3 and entry[:2] == [size, mtime_ns]):
        return None
    dims = entry[2]
    if isinstance(dims, list) and len(dims) == 2 and all(type(v) is int for v in dims):
        return dims[0], dims[1]
    return None


def scan_images(
    files: list[tuple[Path, int, int]], root: Path, cache: Path | None = None
) -> tuple[dict[Path, str], list[Path]]:
    """The unreadable images (path -> why) and the tiny ones among (path, size, mtime_ns).

    Checks in parallel threads every image that `cache` does not hold with the same size and
    mtime; keeps the readable ones' sizes there (not the errors: a file made readable by a
    permission change keeps its mtime).
    """
    cached = read_scan_cache(cache) if cache else {}
    sizes: dict[Path, str | tuple[int, int]] = {}
    todo = []
    for path, size, mtime_ns in files:
        dims = cached_size(cached.get(path.relative_to(root).as_posix()), size, mtime_ns)
        if dims is None:
            todo.append(path)
        else:
            sizes[path] = dims
    sizes.update(zip(todo, parallel_map(image_problem, todo, "checking images"), strict=True))
    if cache and (todo or len(cached) != len(files)):
        write_scan_cache(
            cache,
            {
                path.relative_to(root).as_posix(): [size, mtime_ns, list(sizes[path])]
                for path, size, mtime_ns in files
                if isinstance(sizes[path], tuple)
            },
        )
    bad = {p: r for p, r in sizes.items() if isinstance(r, str)}
    tiny = [p for p, r in sizes.items() if isinstance(r, tuple) and min(r) < MIN_SIDE]
    return bad, tiny


def listing(paths: list[Path], root: Path, notes: dict[Path, str] | None = None) -> str:
    """At most MAX_LISTED paths relative to `root` (with their notes), then a count of the rest."""
    names = [
        f"{p.relative_to(root)}" + (f" ({notes[p]})" if notes else "") for p in paths[:MAX_LISTED]
    ]
    more = f" and {len(paths) - MAX_LISTED} more" if len(paths) > MAX_LISTED else ""
    return ", ".join(names) + more


def read_rgb(path: Path, size: int) -> torch.Tensor:
    """An image file as a (3, size, size) uint8 RGB tensor, EXIF-rotated and resized (no crop);
    raises PIL's errors. An animated image gives its first frame."""
    with Image.open(path) as image:
        image.draft("RGB", (size, size))  # JPEG: decode at the smallest DCT scale >= size
        image = ImageOps.exif_transpose(image)
        if image.mode in {"I;16", "I;16B", "I;16L", "I"}:  # 16-bit grayscale: scale to 8 bits
            image = image.point(lambda v: v / 256).convert("L")
        rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return pil_to_tensor(rgb)


def decode(path: Path, size: int) -> torch.Tensor:
    """`read_rgb`, or a UserError naming the file that the scan at start did not reject."""
    try:
        return read_rgb(path, size)
    except Exception as err:  # PIL raises many types
        raise UserError(f"cannot decode {path}: {err}. Fix: replace or delete the file") from err


def decode_all(paths: list[Path], size: int) -> torch.Tensor:
    """Decode every image once, in parallel threads, into one (N, 3, size, size) uint8 tensor."""
    images = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    with ThreadPoolExecutor(usable_cores()) as pool:
        decoded = pool.map(lambda p: decode(p, size), paths)
        for i, image in enumerate(progress(decoded, len(paths), "decoding images")):
            images[i] = image
    return images


def drop_bad_images(
    root: Path,
    files: list[tuple[Path, int, int]],
    on_bad_image: str,
    cache: Path | None = None,
) -> set[Path]:
    """The unreadable images among `files` to leave out (`on_bad_image="skip"`, with a warning),
    or a UserError naming them; tiny images are named in a warning."""
    bad, tiny = scan_images(files, root, cache)
    if tiny:
        log.warning(
            "%d image(s) smaller than %d px on a side (used, upscaled): %s",
            len(tiny),
            MIN_SIDE,
            listing(tiny, root),
        )
    if not bad:
        return set()
    found = f"{len(bad)} unreadable image(s) in {root}: {listing(list(bad), root, bad)}"
    if on_bad_image != "skip":
        raise UserError(
            f"{found}. Fix: replace or delete them, or data.on_bad_image=skip to train on the rest"
        )
    log.warning("skipping %s (data.on_bad_image=skip)", found)
    return set(bad)


class DecodeDataset(Dataset):
    """Image files as (index, uint8 image or None, error or None): a bad file is an entry."""

    def __init__(self, paths: Sequence[Path], size: int) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return index, read_rgb(self.paths[index], self.size), None
        except Exception as err:  # PIL raises many types
            return index, None, problem(self.paths[index], err)


def collate_decoded(
    items: list[tuple[int, torch.Tensor | None, str | None]], size: int
) -> tuple[list[int], torch.Tensor, dict[int, str]]:
    """A batch of DecodeDataset items: indices and images of the decoded ones, errors by index."""
    good = [(i, image) for i, image, _ in items if image is not None]
    images = (
        torch.stack([image for _, image in good])
        if good
        else torch.empty(0, 3, size, size, dtype=torch.uint8)
    )
    return [i for i, _ in good], images, {i: why for i, _, why in items if why is not None}


def stream_images(
    paths: Sequence[Path],
    size: int,
    batch_size: int = 64,
    num_workers: int | None = None,
    pin_memory: bool = False,
) -> Iterator[tuple[list[int], torch.Tensor, dict[int, str]]]:
    """Decode `paths` in DataLoader workers, in order, a batch at a time.

    Yields (indices into `paths` of the images decoded in this batch, their uint8 (B, 3, size,
    size) tensor, {index: why} for the files of this batch that could not be read), so that one
    bad file is a row with its error rather than the end of the run. Memory holds a few batches
    (two per worker). `num_workers=None`: the usable cores (no more than there are batches).
    """
    batches = -(-len(paths) // batch_size)
    workers = min(usable_cores() if num_workers is None else num_workers, batches)
    yield from DataLoader(
        DecodeDataset(paths, size),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=partial(collate_decoded, size=size),
        pin_memory=pin_memory,
        multiprocessing_context=worker_start(workers),
    )


def list_inputs(path: str | Path | None, key: str = "inputs") -> list[Path]:
    """An image file, or the images of a folder and its sub-folders (sorted; hidden files and
    folders and junk ignored); a UserError naming `key` when there are none."""
    fix = f"Fix: {key}=<an image file or a folder of images>"
    if path is None or not str(path):
        raise UserError(f"no {key} given. {fix}")
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"{key} {path} not found. {fix}")
    found = []
    for folder, dirs, files in os.walk(path, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [p for p in (Path(folder) / f for f in files) if is_image(p)]
    if not found:
        kinds = " ".join(sorted(IMAGE_EXTENSIONS))
        raise UserError(f"no images ({kinds}) in the folder {path} or its sub-folders. {fix}")
    return sorted(found)


def input_classes(paths: Sequence[Path], root: str | Path) -> list[str] | None:
    """Each image's sub-folder of `root` (its class in a folder such as validation/<class>/),
    or None unless every image sits in a sub-folder of `root`."""
    root = Path(root)
    try:
        parts = [p.relative_to(root).parts for p in paths]
    except ValueError:  # not under root
        return None
    return [p[0] for p in parts] if parts and all(len(p) > 1 for p in parts) else None
