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
    """The classes, training images and validation images (None without validation/) of `root`
    in the published layout, checked by `read_classes`."""
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
    given = {"test": validation} if validation.is_dir() else {}
    classes, train, splits = read_classes(root, training, given, on_bad_image, scan_cache)
    return classes, train, splits.get("test")


def read_classes(
    root: Path,
    training: Path,
    given: dict[str, Path],
    on_bad_image: str = "fail",
    scan_cache: str | Path | None = None,
) -> tuple[list[str], Split, dict[str, Split]]:
    """The classes (the sub-folders of `training`), training images and the images of each
    folder in `given` (a role, val or test, to its folder, which must hold every class).

    Checks the folders and scans every image first (the class folders are listed and the images
    checked in parallel; `scan_cache` keeps the checks of unchanged files for the next run): each
    problem raises a UserError naming it and the fix; unreadable images are named
    (`on_bad_image="fail"`) or left out with a warning (`"skip"`); other files are left out with a
    warning, hidden files and junk silently.
    """
    classes = class_folders(training)
    if len(classes) < 2:
        raise UserError(
            f"{training} has {len(classes)} class folder(s) {classes}, training needs at least 2. "
            f"Fix: put each class's images in its own folder {training}/<class>/"
        )
    for top in given.values():
        if extra := sorted(set(class_folders(top)) - set(classes)):
            raise UserError(
                f"{top} has classes that {training} lacks: {', '.join(extra)}. "
                f"Fix: add training images for them, or remove them from {top.name}/"
            )
    tops = [training, *given.values()]
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
    splits = {role: read_split(top, bad) for role, top in given.items()}
    for role, top in given.items():
        check_given(top, classes, splits[role], role, f"{training.name}/")
    return classes, train, splits


def check_given(where: Path, classes: list[str], split: Split, role: str, pool: str) -> None:
    """A UserError when a given `role` split (the folder `where`, or a table file's `role` rows)
    lacks images or classes; without it, the split is carved from `pool`."""
    folder = where.is_dir()
    name = f"{where.name}/" if folder else f"the {role} rows"
    fix = f"or remove {name} (the {role} set is then split from {pool})"
    if not split.paths:
        raise UserError(
            f"no images in {where}. Fix: add images to {name}<class>/, {fix}"
            if folder
            else f"no {role} rows in {where}. Fix: add some, {fix}"
        )
    lacking = missing_classes(where, classes, split)
    if lacking and not folder:
        lacking = [f"class {Path(c).name} of {where}" for c in lacking]
    if lacking:
        raise UserError(
            f"no images in {', '.join(lacking)}: the {role} set ({name}) needs every class. "
            f"Fix: add images there, {fix}"
        )
