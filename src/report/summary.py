"""A sweep's comparison tables, written after a multirun, and a k-fold run's table.

Registered in conf/train.yaml under `hydra.callbacks`, so every `python -m src.train -m ...`
ends with `summary.md` and `summary.csv` in the sweep dir (one row per job from its
`result.json`, best job first) and `summary_grouped.md` and `summary_grouped.csv` (one row per
setting: the jobs that differ only by seed, with their statistics and a paired comparison
with the best setting), both printed. `write_cv` writes a k-fold run's `cv.md` and `cv.csv`.
"""

import csv
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from src.report.stats import describe, mean_interval, paired_difference

log = logging.getLogger(__name__)

COLUMNS = [
    "job",
    "overrides",
    "backbone",
    "freeze",
    "optimizer",
    "lr",
    "trainable_params",
    "total_params",
    "before/test_acc",
    "test/acc",
    "test/acc_ci95",
    "test/loss",
    "val/acc",
    "best_epoch",
    "first_epoch_s",
    "mean_epoch_s",
    "wall_s",
    "status",
    "error",
]
OPTIONAL_COLUMNS = ["test/balanced_acc", "test/macro_f1"]  # after test/acc_ci95, when present


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The run dirs of a sweep: those holding Hydra's `.hydra/` record or a result.json."""
    dirs = {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    dirs |= {  # a cross-validating job's folds are summarised in its own result.json
        p.parent for p in sweep_dir.rglob("result.json") if not p.parent.name.startswith("fold-")
    }
    return sorted(dirs)


def read_row(run_dir: Path, sweep_dir: Path) -> dict[str, Any]:
    """A job's row: its number and overrides (from `.hydra/`) and its result.json."""
    hydra_dir = run_dir / ".hydra"
    row: dict[str, Any] = {"overrides": str(run_dir.relative_to(sweep_dir)), "job": None}
    if (hydra_dir / "overrides.yaml").is_file():
        row["overrides"] = list(OmegaConf.load(hydra_dir / "overrides.yaml"))
    if (hydra_dir / "hydra.yaml").is_file():
        row["job"] = OmegaConf.select(OmegaConf.load(hydra_dir / "hydra.yaml"), "hydra.job.num")
    result = run_dir / "result.json"
    if not result.is_file():  # killed (out of memory, time limit) or still running
        return row | {"status": "no result", "error": f"no {result.name} in {run_dir}"}
    return row | {"status": "completed"} | json.loads(result.read_text())


def is_seed(override: str) -> bool:
    """Whether a Hydra override sets the seed (`seed=1`, `+seed=1`, `++seed=1`, `~seed`)."""
    return override.split("=", 1)[0].lstrip("+~") == "seed"


def result_objective(objective: str, result: dict[str, Any]) -> str:
    """The result key `objective` names: the default val/acc is val/mAP for a multi-label run."""
    return "val/mAP" if objective == "val/acc" and "val/acc" not in result else objective


def direction(objective: str) -> int:
    """1 where lower is better (a loss), -1 where higher is: the sign to sort values by."""
    return 1 if "loss" in objective else -1


def metric_value(value: Any) -> float:
    """A metric's value as a float; nan where it is missing or not a number."""
    return float(value) if isinstance(value, int | float) else math.nan


def rank_key(value: Any, objective: str, job: int | None) -> tuple[bool, float, float]:
    """Sort key: finite values first, the best `objective` first, then by job number."""
    valid = isinstance(value, int | float) and math.isfinite(value)
    job_order = math.inf if job is None else job
    return (not valid, direction(objective) * value if valid else 0.0, job_order)


def sweep_rows(sweep_dir: Path, objective: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Every job's row, best `objective` first (lowest for a loss), and the common overrides.

    Each row's `overrides` keeps only what differs between jobs: what the sweep compared. Its
    `setting` is the same without the seed: the jobs that share one are one setting's seeds.
    """
    rows = [read_row(d, sweep_dir) for d in job_dirs(sweep_dir)]
    lists = [r["overrides"] for r in rows if isinstance(r["overrides"], list)]
    common = [o for o in lists[0] if all(o in other for other in lists)] if len(lists) > 1 else []
    for row in rows:
        row["setting"] = row["overrides"]
        if isinstance(row["overrides"], list):
            varied = [o for o in row["overrides"] if o not in common]
            row["overrides"] = " ".join(varied)
            row["setting"] = " ".join(o for o in varied if not is_seed(o))

    def rank(row: dict[str, Any]) -> tuple[bool, float, float]:
        value = row.get(objective) if row["status"] == "completed" else None
        return rank_key(value, objective, row["job"])

    return sorted(rows, key=rank), common


def interval_text(value: Any) -> Any:
    """A `[lo, hi]` interval as text with 3 decimals; any other value as it is."""
    pair = isinstance(value, list | tuple) and len(value) == 2
    if pair and all(isinstance(v, int | float) for v in value):
        return f"[{value[0]:.3f}, {value[1]:.3f}]"
    return value


def table_values(row: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """A row's values under `names` as the tables hold them: `*_ci95` intervals as text."""
    return {n: interval_text(row.get(n)) if n.endswith("_ci95") else row.get(n) for n in names}


def cell(value: Any) -> str:
    """A value as the markdown table shows it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def columns(objective: str, rows: list[dict[str, Any]]) -> list[str]:
    """The per-job columns: the optional metrics some job has, and the objective if another."""
    names = [*COLUMNS]
    at = names.index("test/acc_ci95") + 1
    names[at:at] = [c for c in OPTIONAL_COLUMNS if any(c in row for row in rows)]
    if objective not in names:
        at = names.index("best_epoch")
        names[at:at] = [objective]
    return names


def table(head: str, names: list[str], rows: list[dict[str, Any]]) -> str:
    """A markdown table of `rows` under `names`, below the line `head`."""
    lines = [head, "", "| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for row in rows:
        lines.append("| " + " | ".join(map(cell, table_values(row, names).values())) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, names: list[str], rows: list[dict[str, Any]]) -> None:
    """`rows` under `names` as a CSV file: intervals as `[lo, hi]` text, the rest as it is."""
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, names)
        writer.writeheader()
        writer.writerows(table_values(row, names) for row in rows)


def markdown(rows: list[dict[str, Any]], common: list[str], objective: str) -> str:
    """The summary as a markdown table under a line naming the objective and shared overrides."""
    head = f"Sorted by {objective} ({'lowest' if direction(objective) > 0 else 'highest'} first)."
    if common:
        head += f" Every job: `{' '.join(common)}`."
    return table(head, columns(objective, rows), rows)


def group_metrics(objective: str) -> list[str]:
    """The metrics the grouped summary describes: the objective and test/acc."""
    return list(dict.fromkeys([objective, "test/mAP" if "mAP" in objective else "test/acc"]))


def group_columns(objective: str) -> list[str]:
    """The grouped summary's columns."""
    stats = [f"{m}_{s}" for m in group_metrics(objective) for s in ("mean", "std", "min", "max")]
    paired = ["paired_n", "diff_vs_best", "diff_lo", "diff_hi", "diff_excludes_0"]
    return ["setting", "seeds", "n", "failed", *stats, *paired]


def by_seed(jobs: list[dict[str, Any]], objective: str) -> dict[Any, float]:
    """The completed jobs' objective per seed (averaged where a seed ran twice: repeated trials)."""
    values: dict[Any, list[float]] = {}
    for job in jobs:
        if job.get("seed") is not None:
            values.setdefault(job["seed"], []).append(metric_value(job.get(objective)))
    return {seed: sum(v) / len(v) for seed, v in values.items()}


def group_rows(rows: list[dict[str, Any]], objective: str) -> list[dict[str, Any]]:
    """One row per setting (jobs that differ only by seed), best mean `objective` first.

    Completed jobs enter the statistics (n, mean, sample std, min, max), the others are only
    counted in `failed`. Each setting but the best is compared with the best seed by seed
    (each job's `seed` from its result.json): `diff_vs_best` is the mean of setting - best over
    the `paired_n` seeds both ran, `diff_lo`-`diff_hi` its 95% t interval (a paired t test),
    `diff_excludes_0` whether that interval leaves 0 out (seed noise alone is unlikely).
    """
    settings: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: math.inf if r["job"] is None else r["job"]):
        settings.setdefault(row["setting"], []).append(row)
    groups, seeds, first_job = [], {}, {}
    for setting, jobs in settings.items():
        done = [job for job in jobs if job["status"] == "completed"]
        group: dict[str, Any] = {
            "setting": setting,
            "seeds": " ".join(str(job["seed"]) for job in done if job.get("seed") is not None),
            "n": len(done),
            "failed": len(jobs) - len(done),
        }
        for metric in group_metrics(objective):
            stats = describe(metric_value(job.get(metric)) for job in done)
            group |= {f"{metric}_{s}": stats[s] for s in ("mean", "std", "min", "max")}
        groups.append(group)
        seeds[setting], first_job[setting] = by_seed(done, objective), jobs[0]["job"]
    mean = f"{objective}_mean"
    groups.sort(key=lambda g: rank_key(g[mean], objective, first_job[g["setting"]]))
    if not groups or not math.isfinite(groups[0][mean]):
        return groups
    best = seeds[groups[0]["setting"]]
    for group in groups[1:]:
        diff = paired_difference(seeds[group["setting"]], best)
        excludes = None if math.isnan(diff["lo"]) else not diff["lo"] <= 0 <= diff["hi"]
        group |= {
            "paired_n": diff["n"],
            "diff_vs_best": diff["mean"],
            "diff_lo": diff["lo"],
            "diff_hi": diff["hi"],
            "diff_excludes_0": excludes,
        }
    return groups


def grouped_markdown(groups: list[dict[str, Any]], common: list[str], objective: str) -> str:
    """The grouped summary as a markdown table under lines saying what its columns mean."""
    order = "lowest" if direction(objective) > 0 else "highest"
    head = (
        f"One row per setting (its jobs differ only by seed), sorted by mean {objective} "
        f"({order} first); failed jobs are counted in `failed`, not in the statistics."
    )
    if common:
        head += f" Every job: `{' '.join(common)}`."
    if groups and math.isfinite(groups[0][f"{objective}_mean"]):
        head += (
            f"\n\ndiff_vs_best: the setting's {objective} minus the best setting's "
            f"(`{groups[0]['setting']}`), mean over the `paired_n` seeds both ran, with its 95% "
            "t interval diff_lo to diff_hi; diff_excludes_0: that interval leaves 0 out."
        )
    return table(head, group_columns(objective), groups)


def write_summary(sweep_dir: Path, objective: str) -> list[dict[str, Any]]:
    """Write the per-job and the grouped summaries in `sweep_dir`, print both; return the jobs.

    Per job: `summary.md`, `summary.csv`; per setting: `summary_grouped.md`, `.csv`.
    """
    rows, common = sweep_rows(sweep_dir, objective)
    if done := [r for r in rows if r["status"] == "completed"]:  # multi-label: val/mAP
        objective = result_objective(objective, done[0])
        rows, common = sweep_rows(sweep_dir, objective)
    write_csv(sweep_dir / "summary.csv", columns(objective, rows), rows)
    jobs = markdown(rows, common, objective)
    (sweep_dir / "summary.md").write_text(jobs)
    print(f"\nSweep summary ({sweep_dir}/summary.md, summary.csv)\n\n{jobs}")
    groups = group_rows(rows, objective)
    write_csv(sweep_dir / "summary_grouped.csv", group_columns(objective), groups)
    grouped = grouped_markdown(groups, common, objective)
    (sweep_dir / "summary_grouped.md").write_text(grouped)
    print(f"By setting ({sweep_dir}/summary_grouped.md, summary_grouped.csv)\n\n{grouped}")
    return rows


def write_cv(run_dir: Path, rows: list[dict[str, Any]], metrics: list[str]) -> str:
    """Write a k-fold run's `cv.csv` and `cv.md` in `run_dir`; return the markdown.

    `rows` are the folds' result.json contents, in fold order. Both files have one row per
    fold (`fold` 0..K-1, then `metrics`), then the `mean` and the sample `std` (ddof=1) rows;
    cv.md adds, per metric, the mean ± std and the 95% t interval of the mean over the folds.
    """
    if not rows:
        raise ValueError("write_cv needs at least one fold's result")
    values = {m: [metric_value(row.get(m)) for row in rows] for m in metrics}
    stats = {m: describe(v) for m, v in values.items()}
    folds = [{"fold": k} | {m: row.get(m) for m in metrics} for k, row in enumerate(rows)]
    folds += [{"fold": s} | {m: stats[m][s] for m in metrics} for s in ("mean", "std")]
    names = ["fold", *metrics]
    write_csv(run_dir / "cv.csv", names, folds)
    lines = []
    for metric in metrics:
        mean, lo, hi = mean_interval(values[metric])
        std = stats[metric]["std"]
        lines.append(
            f"- {metric}: {cell(mean)} ± {cell(std)} "
            f"(95% interval of the mean {cell(lo)}-{cell(hi)})"
        )
    text = table(f"{len(rows)}-fold cross-validation.", names, folds) + "\n" + "\n".join(lines)
    (run_dir / "cv.md").write_text(text + "\n")
    return text + "\n"


class SweepSummary(Callback):
    """Hydra callback: summarise the sweep when a multirun ends; exit 1 if a job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_summary(sweep_dir, config.objective)
        failed = [r for r in rows if r["status"] != "completed"]
        if failed:
            print(
                f"error: {len(failed)} of {len(rows)} jobs failed (status column of "
                f"{sweep_dir / 'summary.md'}; tracebacks in their run dirs' .log files)",
                file=sys.stderr,
            )
            sys.exit(1)
