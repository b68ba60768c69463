"""Finding image files and checking each once (in parallel, with a scan cache that later runs
reuse); inputs of the commands that take files or folders."""

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import PIL
from PIL import Image

from src.data.images import parallel_map, problem
from src.data.table import is_table, read_table
from src.run.errors import UserError

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
JUNK_FILES = {"thumbs.db", "desktop.ini"}  # and every hidden file (.DS_Store, macOS's ._x.jpg)
MAX_LISTED = 20  # bad images named in one message
MIN_SIDE = 8  # images smaller than this (px) are used, with a warning
SCAN_FORMAT = 1  # bump when check_image changes what it accepts


def relative(path: Path, root: Path) -> str:
    """`path` relative to `root` (POSIX), or absolute where it lies elsewhere (a table's row)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


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
        dims = cached_size(cached.get(relative(path, root)), size, mtime_ns)
        if dims is None:
            todo.append(path)
        else:
            sizes[path] = dims
    sizes.update(zip(todo, parallel_map(image_problem, todo, "checking images"), strict=True))
    if cache and (todo or len(cached) != len(files)):
        write_scan_cache(
            cache,
            {
                relative(path, root): [size, mtime_ns, list(sizes[path])]
                for path, size, mtime_ns in files
                if isinstance(sizes[path], tuple)
            },
        )
    bad = {p: r for p, r in sizes.items() if isinstance(r, str)}
    tiny = [p for p, r in sizes.items() if isinstance(r, tuple) and min(r) < MIN_SIDE]
    return bad, tiny


def listing(paths: list[Path], root: Path, notes: dict[Path, str] | None = None) -> str:
    """At most MAX_LISTED paths relative to `root` (with their notes), then a count of the rest."""
    names = [relative(p, root) + (f" ({notes[p]})" if notes else "") for p in paths[:MAX_LISTED]]
    more = f" and {len(paths) - MAX_LISTED} more" if len(paths) > MAX_LISTED else ""
    return ", ".join(names) + more


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


def list_inputs(path: str | Path | None, key: str = "inputs") -> list[Path]:
    """An image file, the images of a folder and its sub-folders (sorted; hidden files and
    folders and junk ignored), or those a table lists (its path column, in its order); a
    UserError naming `key` when there are none."""
    fix = f"Fix: {key}=<an image file, a folder of images or a table of their paths>"
    if path is None or not str(path):
        raise UserError(f"no {key} given. {fix}")
    path = Path(path)
    if path.is_file() and is_table(path):
        return read_table(path, labelled=False).paths
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


def input_classes(
    paths: Sequence[Path], root: str | Path, classes: Sequence[str] = ()
) -> list[str] | None:
    """Each image's class where `root` says it: a table's label column, else its sub-folder of
    `root` (a folder such as validation/<class>/), else (when those are not all `classes`: a
    root of train/<class>/, test/<class>/...) the folder holding it; None where it says none."""
    root = Path(root)
    if root.is_file():
        return read_table(root, labelled=False).labels if is_table(root) else None
    try:
        parts = [p.relative_to(root).parts for p in paths]
    except ValueError:  # not under root
        return None
    if not parts or not all(len(p) > 1 for p in parts):
        return None
    first = [p[0] for p in parts]
    if classes and not set(first) <= set(classes):
        return [p[-2] for p in parts]
    return first
