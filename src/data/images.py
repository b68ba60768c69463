"""Decoding image files to uint8 tensors, in threads or DataLoader workers. Plain torch and PIL,
for every command."""

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image, ImageOps, ImageStat, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2.functional import center_crop, pil_to_tensor
from torchvision.transforms.v2.functional import resize as tv_resize
from tqdm import tqdm

from src.run.errors import UserError

RESIZES = ("squash", "pad", "crop")  # how an image is made square: see fit_square
PROGRESS_MIN = 2000  # images from which a progress bar is shown (on a terminal)
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


def problem(path: Path, err: Exception) -> str:
    """A short reason why `path` could not be read as an image."""
    if isinstance(err, UnidentifiedImageError):
        return "empty file" if path.stat().st_size == 0 else "not an image"
    return str(err) or type(err).__name__


def check_resize(resize: str) -> str:
    """`resize` when it is one of RESIZES, else a one-line UserError."""
    if resize not in RESIZES:
        raise UserError(f"data.resize={resize} is unknown. Fix: data.resize={'|'.join(RESIZES)}")
    return resize


def fit_square(image: Image.Image, size: int, resize: str = "squash") -> Image.Image:
    """An RGB image made a `size` square: squashed (the aspect ratio lost, as published),
    padded (scaled to fit, centred on the image's mean colour: the aspect ratio kept) or
    cropped (the short side scaled to `size`, then the centre: torchvision's Resize(size) +
    CenterCrop(size), the eval transform's operations)."""
    if resize == "squash":
        return image.resize((size, size), Image.Resampling.BILINEAR)
    if resize == "crop":
        return center_crop(tv_resize(image, [size]), [size, size])
    scale = size / max(image.size)
    width, height = (max(1, round(side * scale)) for side in image.size)
    mean = tuple(round(v) for v in ImageStat.Stat(image).mean)
    square = Image.new("RGB", (size, size), mean)
    square.paste(
        image.resize((width, height), Image.Resampling.BILINEAR),
        ((size - width) // 2, (size - height) // 2),
    )
    return square


def read_rgb(path: Path, size: int, resize: str = "squash") -> torch.Tensor:
    """An image file as a (3, size, size) uint8 RGB tensor, EXIF-rotated and made square by
    `resize` (see `fit_square`); raises PIL's errors. An animated image gives its first frame."""
    with Image.open(path) as image:
        image.draft("RGB", (size, size))  # JPEG: decode at the smallest DCT scale >= size
        image = ImageOps.exif_transpose(image)
        if image.mode in {"I;16", "I;16B", "I;16L", "I"}:  # 16-bit grayscale: scale to 8 bits
            image = image.point(lambda v: v / 256).convert("L")
        rgb = fit_square(image.convert("RGB"), size, resize)
    return pil_to_tensor(rgb)


def decode(path: Path, size: int, resize: str = "squash") -> torch.Tensor:
    """`read_rgb`, or a UserError naming the file that the scan at start did not reject."""
    try:
        return read_rgb(path, size, resize)
    except Exception as err:  # PIL raises many types
        raise UserError(f"cannot decode {path}: {err}. Fix: replace or delete the file") from err


def decode_all(paths: list[Path], size: int, resize: str = "squash") -> torch.Tensor:
    """Decode every image once, in parallel threads, into one (N, 3, size, size) uint8 tensor."""
    images = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    with ThreadPoolExecutor(usable_cores()) as pool:
        decoded = pool.map(lambda p: decode(p, size, resize), paths)
        for i, image in enumerate(progress(decoded, len(paths), "decoding images")):
            images[i] = image
    return images


class DecodeDataset(Dataset):
    """Image files as (index, uint8 image or None, error or None): a bad file is an entry."""

    def __init__(self, paths: Sequence[Path], size: int, resize: str = "squash") -> None:
        self.paths, self.size, self.resize = paths, size, resize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return index, read_rgb(self.paths[index], self.size, self.resize), None
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
    resize: str = "squash",
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
        DecodeDataset(paths, size, resize),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=partial(collate_decoded, size=size),
        pin_memory=pin_memory,
        multiprocessing_context=worker_start(workers),
    )
