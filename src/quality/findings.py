"""The audit's findings on one data module's images: rows of label_issues.csv, duplicates.csv and
outliers.csv, from the features and fingerprints of every image (each split's, in split order)."""

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from src.quality.duplicates import CopyRules, find_copies, is_leak
from src.quality.hashes import fingerprints
from src.quality.label_issues import label_issues
from src.quality.neighbours import nearest
from src.quality.outliers import outliers

COLUMNS = {
    "label_issues": ["path", "split", "given", "suggested", "score", "rank"],
    "duplicates": ["path_a", "split_a", "path_b", "split_b", "kind", "score"],
    "outliers": ["path", "split", "score", "rank"],
}


@dataclass
class Images:
    """The audited images: paths (relative to the data root), splits, labels, the pooled
    features (copies, outliers) and those the label-issue probes read (`label_features`: the
    backbone's pooled stages, src.frozen.cache.pooled_stages, or the pooled features)."""

    root: Path
    paths: list[Path]
    splits: list[str]
    labels: torch.Tensor
    features: torch.Tensor
    classes: list[str]
    label_features: torch.Tensor

    @classmethod
    def of(
        cls,
        data: Any,
        features: dict[str, torch.Tensor],
        label_features: dict[str, torch.Tensor] | None = None,
    ) -> "Images":
        """Every image of `data`'s splits once (test left out where it is the val split)."""
        names = [n for n in ("train", "val", "test") if not (n == "test" and data.test_is_val)]
        splits = data.splits()
        pooled = torch.cat([features[n] for n in names])
        return cls(
            data.root,
            [p for n in names for p in splits[n].paths],
            [n for n in names for _ in splits[n].paths],
            torch.tensor([y for n in names for y in splits[n].labels]),
            pooled,
            list(data.classes),
            torch.cat([label_features[n] for n in names]) if label_features else pooled,
        )

    def given(self, i: int) -> tuple[int, ...]:
        """Image i's class, or its labels for label rows."""
        y = self.labels[i]
        return tuple(y.nonzero().flatten().tolist()) if y.ndim else (int(y),)

    def label_names(self, classes: tuple[int, ...]) -> str:
        """The names of `classes`, joined by ';' as a multi-label table may write them."""
        return ";".join(self.classes[c] for c in classes)

    def name(self, i: int) -> str:
        """Image i's path relative to the data root."""
        path = self.paths[i]
        return (
            path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else str(path)
        )


@dataclass
class Findings:
    """The rows of each CSV file, and the settings that listed them."""

    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    label_agreement: float = float("nan")  # the label check's out-of-fold accuracy (mAP)

    def leaks(self) -> list[dict[str, Any]]:
        """The duplicate pairs across train/val and test."""
        return [r for r in self.rows["duplicates"] if is_leak(r["split_a"], r["split_b"])]

    def write(self, out: Path) -> None:
        """label_issues.csv, duplicates.csv and outliers.csv in `out`."""
        for name, columns in COLUMNS.items():
            with open(out / f"{name}.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, columns)
                writer.writeheader()
                writer.writerows(self.rows[name])


def audit_images(images: Images, settings: dict[str, Any], hash_cache: Path | None) -> Findings:
    """Label issues, copies and outliers of `images` by `settings` (conf/audit.yaml's `audit`)."""
    sims, ids = nearest(images.features, settings["neighbours"])
    issues, agreement = label_issues(
        images.label_features,
        images.labels,
        len(images.classes),
        settings["folds"],
        settings["l2"],
        settings["label_neighbours"],
        settings["frac_noise"],
        settings["seed"],
    )
    digests, thumbs = fingerprints(images.paths, hash_cache)
    rules = CopyRules(**settings["copies"])
    copies = find_copies(digests, thumbs, (sims, ids), images.splits, rules)
    far = outliers(sims, settings["outlier_z"])
    s = images.splits
    rows = {
        "label_issues": [
            {
                "path": images.name(i),
                "split": s[i],
                "given": images.label_names(images.given(i)),
                "suggested": images.label_names(hint),
                "score": round(score, 4),
                "rank": rank,
            }
            for rank, (i, hint, score) in enumerate(issues, 1)
        ],
        "duplicates": [
            {
                "path_a": images.name(a),
                "split_a": s[a],
                "path_b": images.name(b),
                "split_b": s[b],
                "kind": kind,
                "score": round(score, 4),
            }
            for a, b, kind, score in copies
        ],
        "outliers": [
            {"path": images.name(i), "split": s[i], "score": round(score, 4), "rank": rank}
            for rank, (i, score, _) in enumerate(far, 1)
        ],
    }
    return Findings(rows, dict(settings), round(agreement, 4))
