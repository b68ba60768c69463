"""A multi-label table (src.data.multilabel) as a LightningDataModule: the images and loaders of
ImageFolderData, with each image's labels a 0/1 row and the splits stratified per label."""

import hashlib
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch

from src.data.folder import Split
from src.data.module import ImageFolderData
from src.data.multilabel import LabelTable, read_label_table
from src.data.multilabel_splits import given_split, holdout_split, kfold_split, warn_missing
from src.data.sampling import SAMPLERS
from src.data.scan import image_problem
from src.data.table import keep_rows, named_lines
from src.run.errors import UserError

log = logging.getLogger(__name__)


def table_data(root: str, task: str = "auto", **kwargs: Any) -> L.LightningDataModule:
    """The data module for `root`: MultiLabelData for a multi-label table (`task`: auto,
    multilabel or multiclass), else ImageFolderData with the multi-label settings left out."""
    multilabel_keys = ("label_columns", "label_delimiter")
    path = Path(root)
    if path.suffix.lower() in {".csv", ".tsv", ".jsonl"} and task != "multiclass":
        found = read_label_table(
            path, kwargs.get("path_column"), kwargs.get("label_column"),
            kwargs.get("label_columns"), kwargs.get("label_delimiter"), task,
            kwargs.get("on_bad_image", "fail"),
        )  # fmt: skip
        if found.task == "multilabel":  # its images are checked each run (no scan cache)
            kwargs.pop("scan_cache", None)
            return MultiLabelData(root, labels=found, **kwargs)
    rest = {
        k: v
        for k, v in kwargs.items()
        if k not in multilabel_keys and not (k.endswith("_column") and v is None)
    }
    return ImageFolderData(root, **rest)


def checked_images(labels: LabelTable, on_bad_image: str) -> LabelTable:
    """`labels` without the rows whose image cannot be decoded (`on_bad_image="skip"`, with a
    warning), or a UserError naming their lines."""
    problems = [image_problem(path) for path in labels.table.paths]
    bad = [n for n, p in zip(labels.table.lines, problems, strict=True) if isinstance(p, str)]
    if not bad:
        return labels
    found = named_lines(labels.table.file, bad, "an unreadable image")
    if on_bad_image != "skip":
        raise UserError(f"{found}. Fix: replace or delete them, or data.on_bad_image=skip")
    log.warning("skipping %s (data.on_bad_image=skip)", found)
    keep = [not isinstance(p, str) for p in problems]
    return replace(labels, table=keep_rows(labels.table, keep), targets=labels.targets[keep])


def label_rows(targets: torch.Tensor) -> list[list[float]]:
    """A 0/1 label matrix as the rows a Split holds (float, so the batches are BCE targets)."""
    return targets.tolist()


class MultiLabelData(ImageFolderData):
    """A table of images with several labels each (`labels`, read by `table_data`, or read here),
    split train/val/test (or K folds) by iterative stratification, or as its split column says.
    `task` is "multilabel"; `classes` the labels; every split's labels are 0/1 rows."""

    task = "multilabel"

    def __init__(
        self,
        root: str,
        image_size: int = 160,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int | str = "auto",
        train_transform: Any = None,
        on_bad_image: str = "fail",
        *,
        test_fraction: float = 0.1,
        folds: int | None = None,
        fold: int = 0,
        in_memory: bool | str = "auto",
        memory_limit_gb: float | None = None,
        pin_memory: bool | None = None,
        sampler: str = "shuffle",
        path_column: str | None = None,
        label_column: str | None = None,
        label_columns: list[str] | None = None,
        label_delimiter: str | None = None,
        labels: Any = None,
        resize: str = "squash",
        augment_on: str = "auto",
        exclude: str | None = None,
        layout: str = "auto",
    ) -> None:
        L.LightningDataModule.__init__(self)
        if exclude is not None:
            raise UserError(
                f"data.exclude={exclude} is not supported for a multi-label table yet. "
                "Fix: delete those rows from the table, and data.exclude=null"
            )
        if layout not in ("auto", "table"):
            raise UserError(f"data.layout={layout} cannot read a table. Fix: data.layout=auto")
        if sampler != "shuffle":
            raise UserError(
                f"sampler={sampler} draws by class, which a multi-label image has several of. "
                f"Fix: sampler=shuffle (of {'|'.join(SAMPLERS)}), with class_weights=auto"
            )
        self._keep_settings(
            root, image_size, batch_size, val_fraction, seed, num_workers, train_transform,
            test_fraction, folds, fold, in_memory, memory_limit_gb, pin_memory, sampler, resize,
            augment_on,
        )  # fmt: skip
        if labels is None:
            labels = read_label_table(
                self.root, path_column, label_column, label_columns, label_delimiter,
                "multilabel", on_bad_image,
            )  # fmt: skip
        self.labels, self.classes = checked_images(labels, on_bad_image), labels.classes
        parts = self.parts(labels.targets)
        self.layout, self.base = "table", labels.table.file.parent
        self.table_sha256 = labels.table.sha256
        self.test_given = labels.table.splits is not None and bool(parts["test"])
        self.pool = self.test_source = str(labels.table.file)
        self._use_splits(
            Split(labels.table.paths, label_rows(labels.targets)),
            parts,
            "no test split: the test figures are of the val images that chose the checkpoint "
            "and thresholds (optimistic). Fix: data.test_fraction=0.1, or test rows",
        )

    def parts(self, targets: torch.Tensor) -> dict[str, list[int]]:
        """Train/val/test row indices: the split column's, one fold's, or a holdout split;
        a UserError for a label without a training image, a warning for one missing elsewhere."""
        table = self.labels.table
        if table.splits is not None:
            if self.folds is not None:
                raise UserError(
                    f"{table.file} has a split column, and data.folds={self.folds} would make "
                    "its own. Fix: data.folds=null, or a table without the split column"
                )
            parts = given_split(table.splits)
        elif self.folds is not None:
            parts = kfold_split(targets, self.folds, self.fold, self.val_fraction, self.seed)
        else:
            parts = holdout_split(targets, self.val_fraction, self.test_fraction, self.seed)
        unlearnt = (targets[parts["train"]].sum(0) == 0).nonzero().flatten().tolist()
        if unlearnt:
            named = ", ".join(self.classes[k] for k in unlearnt)
            raise UserError(
                f"the label(s) {named} of {table.file} have no image in the train split. "
                "Fix: more images with them, or delete them from the table"
            )
        warn_missing(targets, parts, self.classes)
        return parts

    def _make_split_record(self) -> dict[str, Any]:
        """The split's settings, the table's sha256 and per split its image count and the sha256
        of its sorted (path relative to the table, labels) list."""
        folder = self.labels.table.file.parent

        def digest(split: Split) -> str:
            lines = sorted(
                f"{p.relative_to(folder).as_posix() if p.is_relative_to(folder) else p}\t"
                + ";".join(c for c, y in zip(self.classes, row, strict=True) if y)
                for p, row in zip(split.paths, split.labels, strict=True)
            )
            return hashlib.sha256("\n".join(lines).encode()).hexdigest()

        return self._split_settings() | {
            "task": self.task,
            "table_sha256": self.labels.table.sha256,
            "splits": {
                name: {"count": len(s.paths), "sha256": digest(s)}
                for name, s in self.splits().items()
            },
        }
