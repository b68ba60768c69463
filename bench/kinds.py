"""Benches on each CPU kind: the machine as it is, and restricted to AVX2 kernels (in a
subprocess: ATen and oneDNN read their restriction when they start), as an AVX2-only CPU runs."""

import argparse
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from src.run.runtime import cpu_kind

ROOT = Path(__file__).resolve().parents[1]
AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
RESTRICTION = " ".join(f"{k}={v}" for k, v in AVX2.items())


def rows_per_kind(
    parser: argparse.ArgumentParser,
    module: str,
    measure: Callable[[argparse.Namespace], list[dict[str, object]]],
) -> tuple[argparse.Namespace, list[dict[str, object]]]:
    """The arguments `parser` reads, with --kinds (native, avx2) and --json added, and
    `measure(args)`'s rows for each kind: here for native, for avx2 in `python -m module` with the
    same arguments under the restriction. With --json (how that subprocess answers) the rows are
    printed as JSON and the process exits."""
    parser.add_argument(
        "--kinds",
        nargs="+",
        default=["native", "avx2"] if cpu_kind() != "avx2" else ["native"],
        choices=["native", "avx2"],
        help="default: native, and avx2 where the CPU has more than AVX2",
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON and stop")
    args = parser.parse_args()
    if args.json:
        print(json.dumps(measure(args)))
        raise SystemExit(0)
    rows = []
    for kind in args.kinds:
        if kind == "native":
            rows += measure(args)
            continue
        done = subprocess.run(
            [sys.executable, "-m", module, *sys.argv[1:], "--kinds", "native", "--json"],
            cwd=ROOT,
            env={**os.environ, **AVX2},
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        )  # its progress goes to stderr as it comes
        rows += json.loads(done.stdout.splitlines()[-1])
    return args, rows


def table(rows: list[dict[str, object]]) -> list[str]:
    """Markdown table lines, floats with two decimals."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [f"{v:,.2f}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_section(
    path: Path, title: str, intro: str, rows: list[dict[str, object]], notes: Sequence[str] = ()
) -> None:
    """Write `intro`, the table of `rows` and `notes` (paragraphs) as this CPU's section of
    `path` (under `# title`), keeping the sections of other CPUs, and print it: one file gathers
    the figures of every CPU kind measured."""
    heading = f"## {cpu_model()}, {os.cpu_count()} cores"
    lines = [intro, "", *table(rows)] + [line for note in notes for line in ("", note)]
    sections = path.read_text().split("\n## ")[1:] if path.is_file() else []
    kept = [f"## {s.rstrip()}" for s in sections if not f"## {s}".startswith(heading + "\n")]
    section = "\n".join([heading, "", *lines])
    print(section)
    path.write_text("\n\n".join([f"# {title}", *kept, section]) + "\n")


def cpu_model() -> str:
    """CPU model name, family/model numbers and its bf16 instruction sets, from /proc/cpuinfo."""
    info: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    if "model name" not in info:
        return platform.processor() or "unknown"
    bf16 = [f for f in info.get("flags", "").split() if f in ("avx512_bf16", "amx_bf16")]
    return (
        f"{info['model name']} (family {info.get('cpu family')}, model {info.get('model')}; "
        f"{', '.join(bf16) or 'no bf16 instructions'})"
    )
