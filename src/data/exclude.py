"""`data.exclude=<file>`: images that training, eval and audit leave out (one path per line, or
the first column of a CSV such as the audit's label_issues.csv), relative to `data.root`."""

import csv
import hashlib
from pathlib import Path
from typing import Any

from src.run.errors import UserError


def read_exclude(file: str | Path, root: Path) -> list[Path]:
    """The listed images as paths under `root` (absolute ones kept), blank lines and a CSV
    header (`path`) skipped, or a UserError for a missing or unreadable file."""
    file = Path(file)
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(
            f"cannot read data.exclude={file} ({type(err).__name__}). Fix: a text file with one "
            "image path (relative to data.root) per line, or data.exclude=null"
        ) from err
    rows = [row for row in csv.reader(text.splitlines()) if row and row[0].strip()]
    firsts = [row[0].strip() for row in rows]
    if firsts and firsts[0] == "path":  # the header of the audit's CSV files
        firsts = firsts[1:]
    return [Path(p) if Path(p).is_absolute() else root / p for p in dict.fromkeys(firsts)]


def drop_excluded(
    parts: dict[str, list[int]], paths: list[Path], file: str | Path | None, root: Path
) -> tuple[dict[str, list[int]], dict[str, Any] | None]:
    """`parts` (indices into `paths` per split) without the images `file` lists, and the split
    record's `exclude` entry (the file, the count and the sha256 of the sorted list); unchanged
    and None without a file. A listed path that is not an image of the data is a UserError.

    Applied after splitting, so the other images keep their splits: runs before and after a
    cleaning are compared on the same test images, less the excluded ones."""
    if file is None:
        return parts, None
    listed = read_exclude(file, root)
    positions = {p: i for i, p in enumerate(paths)}
    unknown = [p for p in listed if p not in positions]
    if unknown:
        raise UserError(
            f"data.exclude={file} lists {len(unknown)} path(s) that are not images of "
            f"{root}, e.g. {unknown[0]}. Fix: paths relative to data.root, as the audit writes "
            "them, or remove those lines"
        )
    gone = {positions[p] for p in listed}
    names = sorted(
        p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p) for p in listed
    )
    record = {
        "file": str(file),
        "count": len(names),
        "sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(),
    }
    return {name: [i for i in ids if i not in gone] for name, ids in parts.items()}, record
