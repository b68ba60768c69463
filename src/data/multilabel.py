"""Labels of a table (src.data.table) as a label matrix: several labels per image, from one
label column whose cells list them (split by `label_delimiter`, default space or `;`) or from one
0/1 column per label. `task=auto` tells multi-label from multi-class; an image with no label is
a valid negative for every label of a multi-label table."""

import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from src.data.table import (
    LABEL_COLUMNS,
    PATH_COLUMNS,
    SPLIT_COLUMNS,
    Table,
    check_files,
    named_lines,
    pick_column,
    raw_rows,
    read_table,
)
from src.run.errors import UserError

TASKS = ("auto", "multiclass", "multilabel")
DEFAULT_DELIMITERS = re.compile(r"[\s;]+")
BINARY = {"0": 0.0, "1": 1.0}


@dataclass
class LabelTable:
    """A table's rows (paths, splits, lines) with their labels: `classes` sorted, `targets` a
    (rows, classes) float 0/1 matrix, `task` multiclass (one label per row) or multilabel."""

    table: Table
    classes: list[str]
    targets: torch.Tensor
    task: str


def split_cell(cell: str, delimiter: str | None) -> list[str]:
    """The labels a cell lists (none for an empty cell), split by `delimiter` or space/`;`."""
    parts = DEFAULT_DELIMITERS.split(cell) if delimiter is None else cell.split(delimiter)
    return list(dict.fromkeys(p.strip() for p in parts if p.strip()))


def checked_table(file: Path, path_column: str | None) -> tuple[Table, list[str], list[dict]]:
    """The table's checked rows (paths, splits, duplicates: src.data.table) with every row's
    cells, and the column names. The reader is asked for the path column as its label column:
    label cells may be empty here, and are read from the raw rows below."""
    if not file.is_file():
        read_table(file)  # raises its one-line error
    columns, rows = raw_rows(file, file.read_bytes().decode("utf-8-sig", errors="replace"))
    path_key = pick_column(file, columns, path_column, PATH_COLUMNS, "path_column")
    table = read_table(file, path_key or path_column, path_key)  # raises when none is found
    return table, columns, [row for _, row in rows]


def binary_columns(
    file: Path, table: Table, columns: list[str], rows: list[dict], given: list[str] | None
) -> list[str]:
    """The 0/1 label columns: `given`, else every column (not path or split) whose cells are all
    0 or 1. A column holding 0/1 and other values is a UserError naming its lines."""
    if given:
        for name in given:
            pick_column(file, columns, name, (), "label_columns")
    skip = {table.columns["path"], table.columns.get("split")}
    candidates = given or [c for c in columns if c not in skip and c.lower() not in SPLIT_COLUMNS]
    found = []
    for name in candidates:
        cells = [row.get(name, "").strip() for row in rows]
        binary = [cell in BINARY for cell in cells]
        if all(binary):
            found.append(name)
        elif any(binary) or given:
            bad = [n for n, ok in zip(table.lines, binary, strict=True) if not ok]
            raise UserError(
                named_lines(file, bad, f"a cell of label column {name!r} that is not 0 or 1")
                + f". Fix: 0 or 1 in every cell of {name!r}, or data.label_columns=[<the 0/1 "
                "columns>] to leave it out"
            )
    if not found:
        raise UserError(
            f"{file} has no label column (its columns: {', '.join(columns)}; looked for "
            f"{', '.join(LABEL_COLUMNS)}, or columns of 0/1). Fix: data.label_column=<name>"
        )
    return found


def detect_task(file: Path, table: Table, labels: list[list[str]], task: str, form: str) -> str:
    """`multilabel` or `multiclass`: `task`, or for auto multilabel when the labels are 0/1
    columns or a row lists several; a row that does not fit the task is a UserError."""
    if task not in TASKS:
        raise UserError(f"unknown task={task!r}. Fix: task={'|'.join(TASKS)}")
    several = [n for n, row in zip(table.lines, labels, strict=True) if len(row) > 1]
    if task == "auto":
        task = "multilabel" if form == "binary" or several else "multiclass"
    if task == "multiclass":
        if form == "binary" or several:
            what = "0/1 label columns" if form == "binary" else "several labels"
            raise UserError(
                named_lines(file, several or table.lines, f"{what} (task=multiclass)")
                + ". Fix: task=multilabel (or auto), or one label per row"
            )
        if empty := [n for n, row in zip(table.lines, labels, strict=True) if not row]:
            raise UserError(
                named_lines(file, empty, f"an empty label cell (column {form!r})")
                + ". Fix: fill them, or task=multilabel where an image may have no label"
            )
    return task


def check_known(file: Path, table: Table, classes: list[str], targets: torch.Tensor) -> None:
    """With a split column, a label that no training row has (only val/test rows) is a
    UserError naming the label and its lines: the model could not learn it."""
    if table.splits is None:
        return
    train = torch.tensor([s == "train" for s in table.splits])
    unknown = (targets[train].sum(0) == 0) & (targets[~train].sum(0) > 0)
    if unknown.any():
        label = int(unknown.nonzero()[0])
        lines = [n for n, row in zip(table.lines, targets, strict=True) if row[label] > 0]
        names = ", ".join(classes[i] for i in unknown.nonzero().flatten().tolist())
        raise UserError(
            named_lines(file, lines, f"the label(s) {names} only in val/test rows (first one)")
            + ": no training row has it. Fix: add training rows with it, or delete those rows"
        )


def read_label_table(
    file: str | Path,
    path_column: str | None = None,
    label_column: str | None = None,
    label_columns: list[str] | None = None,
    label_delimiter: str | None = None,
    task: str = "auto",
    on_bad_image: str = "fail",
) -> LabelTable:
    """The label matrix of the table `file` (see the module's docstring), checked: each problem
    ends in one UserError naming the lines and the fix. The table's `labels` are each row's
    labels joined by `;`, its label column `binary` for 0/1 columns."""
    file = Path(file)
    table, columns, rows = checked_table(file, path_column)
    label_key = None if label_columns else pick_column(
        file, columns, label_column, LABEL_COLUMNS, "label_column"
    )  # fmt: skip
    if label_key is not None and label_key != table.columns["path"]:
        form = label_key
        labels = [split_cell(row.get(label_key, "").strip(), label_delimiter) for row in rows]
        classes = sorted({label for row in labels for label in row})
    else:
        form = "binary"
        classes = binary_columns(file, table, columns, rows, label_columns)
        labels = [[c for c in classes if BINARY[row[c].strip()]] for row in rows]
    task = detect_task(file, table, labels, task, form)
    index = {name: i for i, name in enumerate(classes)}
    targets = torch.zeros(len(labels), len(classes))
    for i, row in enumerate(labels):
        targets[i, [index[label] for label in row]] = 1.0
    check_known(file, table, classes, targets)
    table = replace(
        table, labels=[";".join(row) for row in labels], columns={**table.columns, "label": form}
    )
    keep = torch.tensor([path.is_file() for path in table.paths])
    table = check_files(table, on_bad_image)
    return LabelTable(table, classes, targets[keep], task)
