"""The audit's pages: report.html (self-contained, thumbnails embedded as small base64 JPEGs) for
a person to review in a browser, and report.md with the same counts."""

import base64
import html
import io
from pathlib import Path
from typing import Any

from PIL import Image

from src.quality.findings import Findings

THUMB = 96  # thumbnail side, pixels
STYLE = (
    "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:4px;text-align:left}img{display:block}"
)


def thumbnail(path: Path) -> str:
    """An <img> of the image as a small embedded JPEG (or a note when it cannot be read)."""
    try:
        with Image.open(path) as image:
            small = image.convert("RGB")
            small.thumbnail((THUMB, THUMB))
        buffer = io.BytesIO()
        small.save(buffer, "JPEG", quality=75)
    except OSError as err:
        return f"<em>unreadable: {html.escape(str(err))}</em>"
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img src="data:image/jpeg;base64,{data}" alt="{html.escape(path.name)}">'


def counts(findings: Findings) -> dict[str, int | float]:
    """What the audit listed, by kind, and how far to trust the label issues."""
    copies = findings.rows["duplicates"]
    return {
        "leaks (copies across train/val and test)": len(findings.leaks()),
        "label issues": len(findings.rows["label_issues"]),
        "label agreement (out-of-fold accuracy of the label check, mAP for multi-label; the "
        "lower, the more clean images among the label issues)": findings.label_agreement,
        "duplicate pairs (all)": len(copies),
        "exact copies": sum(r["kind"] == "exact" for r in copies),
        "outliers": len(findings.rows["outliers"]),
    }


def table(rows: list[dict[str, Any]], images: list[str], root: Path, limit: int) -> str:
    """An HTML table of the first `limit` rows, with a thumbnail of each column in `images`."""
    if not rows:
        return "<p>none</p>"
    columns = [c for c in rows[0] if c not in images]
    head = "".join(f"<th>{c}</th>" for c in images + columns)
    body = []
    for row in rows[:limit]:
        cells = [f"<td>{thumbnail(root / row[c])}{html.escape(row[c])}</td>" for c in images]
        cells += [f"<td>{html.escape(str(row[c]))}</td>" for c in columns]
        body.append(f"<tr>{''.join(cells)}</tr>")
    more = f"<p>{len(rows) - limit} more in the CSV file.</p>" if len(rows) > limit else ""
    return f"<table><tr>{head}</tr>{''.join(body)}</table>{more}"


def write_pages(findings: Findings, root: Path, out: Path, limit: int) -> None:
    """report.html and report.md in `out`; each HTML section shows its first `limit` rows."""
    rows, settings = findings.rows, findings.settings
    copies = [r for r in rows["duplicates"] if r not in findings.leaks()]
    sections = [
        ("Leaks: test images with a copy in train or val", findings.leaks(), ["path_a", "path_b"]),
        ("Label issues (most likely wrong first)", rows["label_issues"], ["path"]),
        ("Duplicates within splits", copies, ["path_a", "path_b"]),
        ("Outliers (unlike every other image)", rows["outliers"], ["path"]),
    ]
    summary = "".join(f"<li>{k}: {v}</li>" for k, v in counts(findings).items())
    shown = html.escape(", ".join(f"{k}={v}" for k, v in settings.items()))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>Data audit</title>',
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Data audit of {html.escape(str(root))}</h1>",
        f"<ul>{summary}</ul><p>Thresholds: {shown}</p>",
    ]
    for title, section, images in sections:
        parts += [f"<h2>{title} ({len(section)})</h2>", table(section, images, root, limit)]
    parts.append("</body></html>")
    (out / "report.html").write_text("\n".join(parts))
    lines = [f"# Data audit of {root}", "", "| found | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in counts(findings).items()]
    lines += ["", f"Thresholds: {', '.join(f'{k}={v}' for k, v in settings.items())}", ""]
    (out / "report.md").write_text("\n".join(lines))
