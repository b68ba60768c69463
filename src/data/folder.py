"""Reading an image folder in the published layout: its classes and images, checked once."""

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from src.data.images import usable_cores
from src.data.scan import (
    IMAGE_EXTENSIONS,
    class_folders,
    drop_bad_images,
    ignored,
    list_folder,
    listing,
    scan_cache_file,
)
from src.run.errors import UserError

log = logging.getLogger(__name__)
LAYOUT = "training/<class>/<images> (optionally validation/<class>/<images>)"


@dataclass
class Split:
    """Image files and their class indices."""

    paths: list[Path]
    labels: list[int]


def missing_classes(folder: Path, classes: list[str], split: Split) -> list[str]:
    """The class folders of `folder` of which `split` holds no image."""
    present = set(split.labels)
    return [str(folder / c) for label, c in enumerate(classes) if label not in present]


def check_classes(training: Path, classes: list[str], split: Split, problem: str) -> None:
    """A UserError naming the class folders of which `split` holds no image."""
    if empty := missing_classes(training, classes, split):
        raise UserError(
            f"{problem} in the class folder(s) {', '.join(empty)}. Fix: add images "
            f"({' '.join(sorted(IMAGE_EXTENSIONS))}) or remove the folder(s)"
        )


def read_folder(
    root: Path, on_bad_image: str = "fail", scan_cache: str | Path | None = None
) -> tuple[list[str], Split, Split | None]:
    """The classes, training images and validation images (None without validation/) of `root`.

    Checks the layout and scans every image first (the class folders are listed and the images
    checked in parallel; `scan_cache` keeps the checks of unchanged files for the next run): each
    problem raises a UserError naming it and the fix; unreadable images are named
    (`on_bad_image="fail"`) or left out with a warning (`"skip"`); other files are left out with a
    warning, hidden files and junk silently.
    """
    training, validation = root / "training", root / "validation"
    if not root.is_dir():
        where = "" if root.is_absolute() else f" (from {Path.cwd()})"
        raise UserError(
            f"data.root={root} is not a folder{where}. Fix: data.root=<a folder holding {LAYOUT}>"
        )
    if not training.is_dir():
        raise UserError(
            f"no training folder {training}. Fix: point data.root at a folder holding {LAYOUT}"
        )
    classes = class_folders(training)
    if len(classes) < 2:
        raise UserError(
            f"{training} has {len(classes)} class folder(s) {classes}, training needs at least 2. "
            f"Fix: put each class's images in its own folder {training}/<class>/"
        )
    has_validation = validation.is_dir()
    extra = sorted(set(class_folders(validation)) - set(classes)) if has_validation else []
    if extra:
        raise UserError(
            f"{validation} has classes that {training} lacks: {', '.join(extra)}. "
            "Fix: add training images for them, or remove them from validation/"
        )
    tops = [training, validation] if has_validation else [training]
    folders = [top / c for top in tops for c in classes if (top / c).is_dir()]
    with ThreadPoolExecutor(usable_cores()) as pool:
        listed = dict(zip(folders, pool.map(list_folder, folders), strict=True))
    unused = [p for top in tops for p in top.iterdir() if not p.is_dir() and not ignored(p)]
    unused += [p for _, others in listed.values() for p in others]
    if unused:
        log.warning(
            "ignoring %d file(s) that are not images in a class folder (%s): %s",
            len(unused),
            " ".join(sorted(IMAGE_EXTENSIONS)),
            listing(unused, root),
        )

    def read_split(top: Path, bad: set[Path]) -> Split:
        split = Split([], [])
        for label, name in enumerate(classes):
            images = listed[top / name][0] if top / name in listed else []
            paths = [p for p, _, _ in images if p not in bad]
            split.paths += paths
            split.labels += [label] * len(paths)
        return split

    check_classes(training, classes, read_split(training, set()), "no images")
    files = [file for images, _ in listed.values() for file in images]
    cache = scan_cache_file(scan_cache, root) if scan_cache else None
    bad = drop_bad_images(root, files, on_bad_image, cache)
    train = read_split(training, bad)
    check_classes(training, classes, train, "only unreadable images")
    test = read_split(validation, bad) if has_validation else None
    if test is not None and not test.paths:
        raise UserError(
            f"no images in {validation}. Fix: add images to validation/<class>/, or remove "
            "validation/ (the test set is then split from training/)"
        )
    if test is not None and (lacking := missing_classes(validation, classes, test)):
        raise UserError(
            f"no images in {', '.join(lacking)}: the test set (validation/) needs every class. "
            "Fix: add images there, or remove validation/ (the test set is then split from "
            "training/)"
        )
    return classes, train, test
