"""The layouts that `data.root` may hold, detected from what is there or named by `data.layout`:
published (training/ [+ validation/]), splits (train/ [+ val/ valid/ validation/, test/]),
classes (a folder per class) and a table (CSV/TSV/JSONL of path, label [, split])."""

import logging
from dataclasses import dataclass
from pathlib import Path

from src.data.folder import LAYOUT, Split, check_given, read_classes, read_folder
from src.data.scan import drop_bad_images, ignored, scan_cache_file
from src.data.table import (
    TABLE_SUFFIXES,
    Table,
    check_files,
    is_table,
    keep_rows,
    named_lines,
    read_table,
)
from src.run.errors import UserError

log = logging.getLogger(__name__)
LAYOUTS = ("auto", "published", "splits", "classes", "table")
SPLIT_FOLDERS = {"val": ("val", "valid", "validation"), "test": ("test",)}
SPLIT_NAMES = {"train", "training", *(n for names in SPLIT_FOLDERS.values() for n in names)}
ALL_LAYOUTS = (
    f"{LAYOUT}; train/<class>/ with val/ (or valid/, validation/) and/or test/; a folder per "
    f"class; or a table ({' '.join(TABLE_SUFFIXES)}) of image paths and labels"
)


@dataclass
class Source:
    """What a layout gives: the classes, the training pool (the missing splits are carved from
    it), the val and test splits it gives itself, the folder the record's paths are relative
    to, where each given split comes from, and a table's bytes hash."""

    layout: str
    classes: list[str]
    train: Split
    given: dict[str, Split]
    base: Path
    origin: dict[str, str]
    table_sha256: str | None = None


def subfolders(root: Path) -> set[str]:
    """The names of the visible sub-folders of `root`."""
    return {p.name for p in root.iterdir() if p.is_dir() and not ignored(p)}


def detect_layout(root: Path) -> str:
    """The layout of `root` (see the module's docstring); a UserError when it is none or two."""
    if root.is_file():
        if is_table(root):
            return "table"
        raise UserError(
            f"data.root={root} is a file but not a table ({' '.join(TABLE_SUFFIXES)}). "
            "Fix: data.root=<a folder of images, or a table of image paths and labels>"
        )
    if not root.is_dir():
        where = "" if root.is_absolute() else f" (from {Path.cwd()})"
        raise UserError(
            f"data.root={root} is not a folder{where}. Fix: data.root=<a folder holding "
            f"{LAYOUT}, or one of the other layouts: {ALL_LAYOUTS}>"
        )
    names = subfolders(root)
    if {"training", "train"} <= names:
        raise UserError(
            f"{root} holds both training/ (the published layout) and train/ (the splits layout). "
            "Fix: data.layout=published or data.layout=splits"
        )
    if "training" in names:
        return "published"
    if "train" in names:
        return "splits"
    if not names:
        raise UserError(
            f"no training folder {root / 'training'}. Fix: point data.root at a folder holding "
            f"{ALL_LAYOUTS}"
        )
    if roles := sorted(names & SPLIT_NAMES):
        raise UserError(
            f"{root} holds {', '.join(f'{n}/' for n in roles)} but no train/ (or training/). "
            "Fix: add train/<class>/, or data.layout=classes if these folders are classes"
        )
    return "classes"


def split_folders(root: Path) -> dict[str, Path]:
    """The val and test folders of a splits layout, each by the one name it has in `root`."""
    found = {}
    names = subfolders(root)
    for role, aliases in SPLIT_FOLDERS.items():
        present = [name for name in aliases if name in names]
        if len(present) > 1:
            raise UserError(
                f"{root} holds {' and '.join(f'{n}/' for n in present)}: which is the {role} "
                f"split? Fix: keep one of them (rename or move the others)"
            )
        if present:
            found[role] = root / present[0]
    return found


def read_source(
    root: Path,
    layout: str = "auto",
    on_bad_image: str = "fail",
    scan_cache: str | Path | None = None,
    path_column: str | None = None,
    label_column: str | None = None,
) -> Source:
    """The images of `root` in `layout` (auto: detected), checked, with each split's origin."""
    if layout not in LAYOUTS:
        raise UserError(f"data.layout={layout} is unknown. Fix: data.layout={'|'.join(LAYOUTS)}")
    if layout == "auto":
        layout = detect_layout(root)
    elif layout != "table" and root.is_file():
        raise UserError(f"data.root={root} is a file. Fix: data.layout=table, or a folder")
    if layout == "published":
        classes, train, test = read_folder(root, on_bad_image, scan_cache)
        given = {"test": test} if test is not None else {}
        origin = {"train": "training/"} | ({"test": "validation/"} if test else {})
        return Source(layout, classes, train, given, root, origin)
    if layout == "table":
        return read_table_source(root, on_bad_image, scan_cache, path_column, label_column)
    if not root.is_dir():
        raise UserError(f"data.root={root} is not a folder. Fix: data.root=<a folder of images>")
    if layout == "classes":
        classes, train, _ = read_classes(root, root, {}, on_bad_image, scan_cache)
        return Source(layout, classes, train, {}, root, {"train": "the class folders"})
    if not (root / "train").is_dir():
        raise UserError(f"no train folder {root / 'train'}. Fix: add it, or another data.layout")
    folders = split_folders(root)
    classes, train, given = read_classes(root, root / "train", folders, on_bad_image, scan_cache)
    origin = {"train": "train/"} | {role: f"{top.name}/" for role, top in folders.items()}
    return Source(layout, classes, train, given, root, origin)


def table_split(table: Table, classes: list[str], role: str | None) -> Split:
    """The rows of `role` (all rows for None) as a Split, sorted by path within each class so
    that the split does not depend on the order of the rows."""
    rows = sorted(
        (classes.index(label), path)
        for i, (path, label) in enumerate(zip(table.paths, table.labels, strict=True))
        if role is None or table.splits[i] == role
    )
    return Split([path for _, path in rows], [label for label, _ in rows])


def read_table_source(
    file: Path,
    on_bad_image: str,
    scan_cache: str | Path | None,
    path_column: str | None,
    label_column: str | None,
) -> Source:
    """A table's rows as a Source: missing and unreadable images named by line (or skipped),
    classes (the label values, sorted) checked as a folder's are."""
    table = check_files(read_table(file, path_column, label_column), on_bad_image)
    base = file.parent
    stats = [path.stat() for path in table.paths]
    files = [(p, s.st_size, s.st_mtime_ns) for p, s in zip(table.paths, stats, strict=True)]
    cache = scan_cache_file(scan_cache, file) if scan_cache else None
    bad = drop_bad_images(base, files, on_bad_image, cache)
    table = keep_readable(table, bad)
    classes = sorted(set(table.labels))
    roles = table.splits or ["train"] * len(table.paths)
    trained = {label for label, role in zip(table.labels, roles, strict=True) if role == "train"}
    if only := sorted(set(classes) - trained):
        lines = [n for n, y in zip(table.lines, table.labels, strict=True) if y in only]
        raise UserError(
            named_lines(file, lines, f"class(es) {', '.join(only)} with no train row")
            + ". Fix: add train rows for them, or remove those rows"
        )
    if len(classes) < 2:
        raise UserError(
            f"{file} has {len(classes)} class(es) {classes} (column {table.columns['label']!r}), "
            "training needs at least 2. Fix: label the images of each class"
        )
    if table.splits is None:
        train, given = table_split(table, classes, None), {}
    else:
        train = table_split(table, classes, "train")
        given = {r: table_split(table, classes, r) for r in ("val", "test") if r in table.splits}
        for role, split in given.items():
            check_given(file, classes, split, role, "the train rows")
    column = table.columns.get("split")
    origin = {r: f"the {r} rows of {file.name}" for r in ("train", *given)} if column else {}
    origin = origin or {"train": file.name}
    return Source("table", classes, train, given, base, origin, table.sha256)


def keep_readable(table: Table, bad: set[Path]) -> Table:
    """`table` without the rows of the unreadable images `bad` (skipped by on_bad_image)."""
    return keep_rows(table, [path not in bad for path in table.paths]) if bad else table


def describe(source: Source, root: Path, carved: dict[str, str]) -> str:
    """The one log line: the layout found and the folder or column (or carving) of each split."""
    rest = " (less the splits carved from it)" if set(carved) - set(source.given) else ""
    parts = [f"train = {source.origin['train']}{rest}"] + [
        f"{role} = {source.origin.get(role) or carved.get(role, '')}" for role in ("val", "test")
    ]
    return f"data layout {source.layout} in {root}: " + "; ".join(parts)
