"""A sweep's comparison table: one row per job from its `result.json`, written after a multirun.

Registered in conf/train.yaml under `hydra.callbacks`, so every `python -m src.train -m ...`
ends with `summary.md` and `summary.csv` in the sweep dir, printed, best job first.
"""

import csv
import functools
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from src.errors import UserError

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
    "test/loss",
    "val/acc",
    "best_epoch",
    "first_epoch_s",
    "mean_epoch_s",
    "wall_s",
    "status",
    "error",
]


def user_error(err: BaseException) -> UserError | None:
    """The UserError behind `err`, if any (Hydra's `instantiate` wraps what it raises)."""
    while err is not None and not isinstance(err, UserError):
        err = err.__cause__
    return err


def error_line(err: BaseException) -> str:
    """One line for an error: a UserError's message, else `Type: first line of the message`."""
    err = user_error(err) or err
    lines = str(err).strip().splitlines()
    first = lines[0] if lines else ""
    if isinstance(err, UserError):
        return first
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def record_failure(
    main: Callable[[DictConfig], float],
) -> Callable[[DictConfig], float | None]:
    """In a multirun, turn a job's exception into a `failed` result.json and no objective.

    Hydra's sweepers re-raise a failed job's exception once its batch ends, which skips the
    callbacks that summarise the sweep, and an `exit_on_user_error` exit would end the sweep
    at once. So here the error is logged (with its traceback unless it is a UserError) and
    recorded in the job's dir, the job returns None (Optuna marks that trial failed; a NaN
    would crash its sweeper), the other jobs run and the summary lists the failure. A single
    run raises as usual.
    """

    @functools.wraps(main)
    def wrapper(cfg: DictConfig) -> float | None:
        if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
            return main(cfg)
        start = time.perf_counter()
        try:
            return main(cfg)
        except Exception as err:
            log.error("job failed: %s", error_line(err), exc_info=user_error(err) is None)
            target = str(OmegaConf.select(cfg, "optimizer._target_", default="") or "")
            result = {
                "backbone": OmegaConf.select(cfg, "backbone.name", default=None),
                "freeze": OmegaConf.select(cfg, "freeze", default=None),
                "optimizer": target.rsplit(".", 1)[-1] or None,
                "lr": OmegaConf.select(cfg, "optimizer.lr", default=None),
                "wall_s": time.perf_counter() - start,
                "status": "failed",
                "error": error_line(err),
            }
            out = Path(HydraConfig.get().runtime.output_dir)
            (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
            return None

    return wrapper


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The run dirs of a sweep: those holding Hydra's `.hydra/` record or a result.json."""
    dirs = {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    dirs |= {p.parent for p in sweep_dir.rglob("result.json")}
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


def sweep_rows(sweep_dir: Path, objective: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Every job's row, best `objective` first (lowest for a loss), and the common overrides.

    Each row's `overrides` keeps only what differs between jobs: what the sweep compared.
    """
    rows = [read_row(d, sweep_dir) for d in job_dirs(sweep_dir)]
    lists = [r["overrides"] for r in rows if isinstance(r["overrides"], list)]
    common = [o for o in lists[0] if all(o in other for other in lists)] if len(lists) > 1 else []
    for row in rows:
        if isinstance(row["overrides"], list):
            row["overrides"] = " ".join(o for o in row["overrides"] if o not in common)
    sign = 1 if "loss" in objective else -1

    def rank(row: dict[str, Any]) -> tuple[bool, float, float]:
        value = row.get(objective)
        valid = row["status"] == "completed" and isinstance(value, int | float)
        valid = valid and math.isfinite(value)
        job = row["job"] if row["job"] is not None else math.inf
        return (not valid, sign * value if valid else 0.0, job)

    return sorted(rows, key=rank), common


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


def columns(objective: str) -> list[str]:
    """The table's columns, with the objective after the test metrics if it is another one."""
    at = COLUMNS.index("best_epoch")
    return COLUMNS if objective in COLUMNS else [*COLUMNS[:at], objective, *COLUMNS[at:]]


def markdown(rows: list[dict[str, Any]], common: list[str], objective: str) -> str:
    """The summary as a markdown table under a line naming the objective and shared overrides."""
    names = columns(objective)
    head = f"Sorted by {objective} ({'lowest' if 'loss' in objective else 'highest'} first)."
    if common:
        head += f" Every job: `{' '.join(common)}`."
    lines = [head, "", "| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in names) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_summary(sweep_dir: Path, objective: str) -> list[dict[str, Any]]:
    """Write `summary.md` and `summary.csv` in `sweep_dir`, print the table; return the rows."""
    rows, common = sweep_rows(sweep_dir, objective)
    with (sweep_dir / "summary.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, columns(objective), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows, common, objective)
    (sweep_dir / "summary.md").write_text(table)
    print(f"\nSweep summary ({sweep_dir}/summary.md, summary.csv)\n\n{table}")
    return rows


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
