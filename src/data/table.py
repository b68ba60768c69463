"""Reading a table of images (CSV, TSV or JSON Lines): one row per image, a path column (relative
to the table's folder, or absolute), a label column and an optional split column; other columns
are ignored. Labels stay strings here (a multi-label reader splits them later)."""

import csv
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from src.run.errors import UserError

log = logging.getLogger(__name__)

TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": None}
PATH_COLUMNS = ("path", "filename", "file_name", "file", "filepath", "file_path", "image",
                "image_path", "img", "fname")  # fmt: skip
LABEL_COLUMNS = ("label", "labels", "class", "class_name", "category", "target", "y")
SPLIT_COLUMNS = ("split", "subset", "set")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val",
               "validation": "val", "test": "test", "testing": "test"}  # fmt: skip
MAX_NAMED = 10  # rows named in one message


@dataclass
class Table:
    """A table's rows: resolved image paths, label cells (stripped strings; None for a table
    read without labels), the split of each
    row (train/val/test, or None without a split column), each row's line number in the file,
    and the sha256 of the file's bytes (part of the split record: an edited table is noticed)."""

    file: Path
    paths: list[Path]
    labels: list[str] | None
    splits: list[str] | None
    lines: list[int]
    sha256: str
    columns: dict[str, str]


def is_table(path: Path) -> bool:
    """A file whose suffix names a table format (.csv, .tsv, .jsonl)."""
    return path.suffix.lower() in TABLE_SUFFIXES


def named_lines(file: Path, lines: list[int], what: str) -> str:
    """'<what> on line(s) 3, 7 of <file>' with at most MAX_NAMED line numbers, then a count."""
    shown = ", ".join(map(str, lines[:MAX_NAMED]))
    more = f" and {len(lines) - MAX_NAMED} more" if len(lines) > MAX_NAMED else ""
    return f"{what} on line(s) {shown}{more} of {file}"


def raw_rows(file: Path, text: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The column names and the (line number, {column: cell}) rows of a table's text."""
    delimiter = TABLE_SUFFIXES[file.suffix.lower()]
    if delimiter is not None:
        reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
        columns = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = columns
        rows = [
            (reader.line_num, {k: (v or "") for k, v in row.items() if k is not None})
            for row in reader
            if any((v or "").strip() for v in row.values() if isinstance(v, str))
        ]
        return columns, rows
    columns: dict[str, None] = {}
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise UserError(
                f"line {number} of {file} is not JSON ({err}). Fix: one JSON object per line"
            ) from err
        if not isinstance(row, dict):
            raise UserError(f"line {number} of {file} is not a JSON object. Fix: {{...}} per line")
        columns.update(dict.fromkeys(row))
        rows.append((number, {k: "" if v is None else str(v) for k, v in row.items()}))
    return list(columns), rows


def pick_column(
    file: Path, columns: list[str], given: str | None, candidates: tuple[str, ...], key: str
) -> str | None:
    """The column named `given`, else the first column whose lower-cased name is a candidate."""
    if given:
        if given not in columns:
            raise UserError(
                f"{file} has no column {given!r} (its columns: {', '.join(columns)}). "
                f"Fix: data.{key}=<one of them>"
            )
        return given
    lowered = {c.lower(): c for c in columns}
    return next((lowered[c] for c in candidates if c in lowered), None)


def read_table(
    file: Path,
    path_column: str | None = None,
    label_column: str | None = None,
    labelled: bool = True,
) -> Table:
    """The rows of the table `file`, checked: each problem (no such column, an empty path or
    label cell, an unknown split, a file listed twice) raises a UserError naming the lines.
    `labelled=False` (images to predict): the labels are read only where there is a column.
    Whether each image exists and reads is checked by the caller (data.on_bad_image)."""
    if not file.is_file():
        raise UserError(f"data.root={file} not found. Fix: data.root=<a .csv, .tsv or .jsonl>")
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{file} is not UTF-8 text ({err}). Fix: save it as UTF-8") from err
    columns, rows = raw_rows(file, text)
    if not rows:
        raise UserError(f"{file} has no rows. Fix: a header line, then one row per image")
    keys = {
        "path": pick_column(file, columns, path_column, PATH_COLUMNS, "path_column"),
        "label": pick_column(file, columns, label_column, LABEL_COLUMNS, "label_column"),
        "split": pick_column(file, columns, None, SPLIT_COLUMNS, ""),
    }
    for key, names in (("path", PATH_COLUMNS), ("label", LABEL_COLUMNS)):
        if keys[key] is None and (key == "path" or labelled):
            raise UserError(
                f"{file} has no {key} column (its columns: {', '.join(columns)}; looked for "
                f"{', '.join(names)}). Fix: data.{key}_column=<the column's name>"
            )
    keys = {name: key for name, key in keys.items() if key}
    cells = {name: [row.get(key, "").strip() for _, row in rows] for name, key in keys.items()}
    lines = [number for number, _ in rows]
    for name in ("path", "label"):
        empty = [n for n, c in zip(lines, cells.get(name, ()), strict=False) if not c]
        if empty:
            raise UserError(
                named_lines(file, empty, f"an empty {name} cell (column {keys[name]!r})")
                + ". Fix: fill them, or delete those rows"
            )
    return Table(
        file,
        image_paths(file, lines, cells["path"]),
        cells.get("label"),
        row_splits(file, lines, cells["split"], keys["split"]) if "split" in cells else None,
        lines,
        hashlib.sha256(raw).hexdigest(),
        keys,
    )


def row_splits(file: Path, lines: list[int], cells: list[str], column: str) -> list[str]:
    """Each row's split (train, val or test; aliases such as valid accepted), or a UserError
    naming the lines of the others."""
    if unknown := [n for n, s in zip(lines, cells, strict=True) if s.lower() not in SPLIT_NAMES]:
        raise UserError(
            named_lines(file, unknown, f"a split (column {column!r}) not train/val/test")
            + ". Fix: train, val or test in each row"
        )
    return [SPLIT_NAMES[s.lower()] for s in cells]


def image_paths(file: Path, lines: list[int], cells: list[str]) -> list[Path]:
    """The path cells resolved against the table's folder (absolute ones kept), or a UserError
    naming the lines that list an image a second time."""
    paths = [Path(p) if Path(p).is_absolute() else file.parent / p for p in cells]
    first: dict[Path, int] = {}
    repeated = []
    for number, path in zip(lines, paths, strict=True):
        resolved = path.resolve()
        if resolved in first:
            repeated.append(number)
        first.setdefault(resolved, number)
    if repeated:
        raise UserError(
            named_lines(file, repeated, "an image listed a second time")
            + ". Fix: one row per image (delete the repeated rows)"
        )
    return paths


def keep_rows(table: Table, keep: list[bool]) -> Table:
    """`table` with only the rows where `keep` is true (the same file, hash and columns)."""

    def kept(values: list) -> list:
        return [v for v, k in zip(values, keep, strict=True) if k]

    labels = kept(table.labels) if table.labels is not None else None
    splits = kept(table.splits) if table.splits is not None else None
    return Table(
        table.file, kept(table.paths), labels, splits, kept(table.lines),
        table.sha256, table.columns,
    )  # fmt: skip


def check_files(table: Table, on_bad_image: str = "fail") -> Table:
    """`table` without the rows whose image file is missing (`on_bad_image="skip"`, with a
    warning), or a UserError naming their lines."""
    keep = [path.is_file() for path in table.paths]
    if all(keep):
        return table
    missing = [n for n, k in zip(table.lines, keep, strict=True) if not k]
    found = named_lines(table.file, missing, "a missing image file")
    if on_bad_image != "skip":
        raise UserError(
            f"{found}. Fix: correct the paths (relative to {table.file.parent}, or absolute), "
            "or data.on_bad_image=skip to train on the rest"
        )
    log.warning("skipping %s (data.on_bad_image=skip)", found)
    return keep_rows(table, keep)
