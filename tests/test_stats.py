"""Intervals and paired differences, the sweep's grouped summary and the k-fold tables."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from scipy import stats as scipy_stats

from src.report.stats import (
    accuracy_ci,
    describe,
    mean_interval,
    paired_difference,
    wilson_interval,
)
from src.report.summary import write_cv, write_summary

REPO = Path(__file__).resolve().parents[1]
Z = 1.959964


def wilson_roots(correct: int, n: int) -> tuple[float, float]:
    """The Wilson bounds as the roots of (p - x)^2 = z^2 x (1 - x) / n, a quadratic in x."""
    p, k = correct / n, Z * Z / n
    a, b, c = 1 + k, -(2 * p + k), p * p
    root = math.sqrt(b * b - 4 * a * c)
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


def test_wilson_interval_matches_the_quadratic_and_hand_values() -> None:
    lo, hi = wilson_interval(135, 150)
    assert (round(lo, 4), round(hi, 4)) == (0.8416, 0.9385)  # by hand, 4 decimals
    assert (lo, hi) == pytest.approx(wilson_roots(135, 150), abs=1e-12)
    assert lo < 135 / 150 < hi
    assert accuracy_ci(0.9, 150) == (lo, hi)
    assert accuracy_ci(0.8933, 150) == wilson_interval(134, 150)  # rounds to the count


@pytest.mark.parametrize(("correct", "n"), [(0, 10), (10, 10), (1, 3), (7, 40), (999, 1000)])
def test_wilson_interval_brackets_the_accuracy_inside_0_1(correct: int, n: int) -> None:
    lo, hi = wilson_interval(correct, n)
    assert 0.0 <= lo <= correct / n <= hi <= 1.0 and lo < hi
    assert (lo, hi) == pytest.approx(wilson_roots(correct, n), abs=1e-12)


def test_wilson_interval_at_the_ends_and_as_n_grows() -> None:
    assert wilson_interval(0, 10) == (0.0, pytest.approx(Z * Z / (10 + Z * Z)))
    assert wilson_interval(10, 10) == (pytest.approx(10 / (10 + Z * Z)), 1.0)
    widths = [hi - lo for lo, hi in (wilson_interval(9 * n // 10, n) for n in (10, 100, 1000))]
    assert widths[0] > widths[1] > widths[2]
    assert widths[1] / widths[2] == pytest.approx(math.sqrt(10), rel=0.05)  # ~ 1/sqrt(n)


@pytest.mark.parametrize(("correct", "n"), [(1, 0), (0, -3), (-1, 5), (6, 5)])
def test_wilson_interval_rejects_impossible_counts(correct: int, n: int) -> None:
    with pytest.raises(ValueError, match="n must be positive|correct must be between"):
        wilson_interval(correct, n)


def test_mean_interval_and_describe_on_known_numbers() -> None:
    mean, lo, hi = mean_interval([1, 2, 3, 4, 5])
    half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4) * s / sqrt(n), s^2 = 2.5
    assert (mean, lo, hi) == pytest.approx((3.0, 3 - half, 3 + half), abs=1e-6)
    reference = scipy_stats.t.interval(0.95, 4, loc=3, scale=scipy_stats.sem([1, 2, 3, 4, 5]))
    assert (lo, hi) == pytest.approx(reference, abs=1e-12)
    single = mean_interval([0.7])
    assert single[0] == 0.7 and math.isnan(single[1]) and math.isnan(single[2])
    with pytest.raises(ValueError):
        mean_interval([])
    assert describe([0.8, 0.84, 0.82]) == {
        "n": 3,
        "mean": pytest.approx(0.82),
        "std": pytest.approx(0.02),  # sample std: sqrt((0.02^2 + 0.02^2) / 2)
        "min": 0.8,
        "max": 0.84,
    }
    one = describe([0.5])
    assert (one["n"], one["mean"], one["min"], one["max"]) == (1, 0.5, 0.5, 0.5)
    assert math.isnan(one["std"])
    assert math.isnan(describe([0.8, math.nan])["mean"])  # a diverged seed shows


def test_paired_difference_is_a_paired_t_test_over_the_shared_seeds() -> None:
    a = {1: 0.70, 2: 0.76, 42: 0.70, 7: 0.99}  # seed 7 only in a, seed 3 only in b
    b = {42: 0.82, 2: 0.84, 1: 0.80, 3: 0.10}
    diff = paired_difference(a, b)
    test = scipy_stats.ttest_rel([0.70, 0.76, 0.70], [0.80, 0.84, 0.82])
    interval = test.confidence_interval(0.95)
    assert diff["n"] == 3 and diff["mean"] == pytest.approx(-0.10)
    assert (diff["lo"], diff["hi"]) == pytest.approx((interval.low, interval.high), abs=1e-12)
    assert diff["hi"] < 0  # pairing: the 0.02 spread of the differences, not of the values
    one = paired_difference({1: 0.5, 2: 0.6}, {2: 0.4})
    assert one["n"] == 1 and one["mean"] == pytest.approx(0.2)
    assert math.isnan(one["lo"]) and math.isnan(one["hi"])
    none = paired_difference({1: 0.5}, {2: 0.4})
    assert none["n"] == 0 and math.isnan(none["mean"])


@pytest.mark.slow
def test_importing_the_summary_does_not_import_scipy() -> None:
    code = "import sys, src.report.summary, src.report.stats; print('scipy' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert run.stdout.strip() == "False", run.stderr


def write_job(sweep: Path, num: int, overrides: list[str], result: dict[str, Any] | None) -> None:
    """A job's run dir as Hydra and train() leave it: `.hydra/` and result.json."""
    run_dir = sweep / (",".join(overrides) or "base")
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run_dir / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    num: {num}\n")
    if result is not None:
        (run_dir / "result.json").write_text(json.dumps(result))


def seed_sweep(sweep: Path) -> None:
    """2 settings x 3 seeds (1, 2 from overrides, 42 from the config) and a failed lr=0.1 job.

    Per seed, lr=0.1 is 0.10, 0.08 and 0.12 below lr=0.01 in test/acc (and above in loss);
    its jobs come in another seed order, so pairing by job order would be wrong.
    """
    jobs = [
        (["lr=0.01", "seed=1"], 1, 0.80, 0.50),
        (["lr=0.01", "seed=2"], 2, 0.84, 0.40),
        (["lr=0.01"], 42, 0.82, 0.45),
        (["lr=0.1", "seed=2"], 2, 0.76, 0.70),
        (["lr=0.1"], 42, 0.70, 0.90),
        (["lr=0.1", "seed=1"], 1, 0.70, 0.80),
    ]
    for num, (overrides, seed, acc, loss) in enumerate(jobs):
        result = {"seed": seed, "test/acc": acc, "test/loss": loss, "test/macro_f1": acc - 0.1}
        result["test/acc_ci95"] = list(accuracy_ci(acc, 150))
        write_job(sweep, num, ["data=imagefolder", *overrides], result)
    failed = {"lr": 0.1, "wall_s": 1.0, "status": "failed", "error": "ValueError: boom"}
    write_job(sweep, 6, ["data=imagefolder", "lr=0.1", "seed=3"], failed)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as file:
        return list(csv.DictReader(file))


def test_grouped_summary_has_one_row_per_setting_and_the_paired_difference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_sweep(tmp_path)
    jobs = write_summary(tmp_path, "test/acc")
    assert len(jobs) == 7
    best, other = read_csv(tmp_path / "summary_grouped.csv")  # exactly 2 rows
    assert (best["setting"], best["n"], best["failed"], best["seeds"]) == (
        "lr=0.01",
        "3",
        "0",
        "1 2 42",
    )
    assert (other["setting"], other["n"], other["failed"]) == ("lr=0.1", "3", "1")
    assert float(best["test/acc_mean"]) == pytest.approx(0.82)
    assert float(best["test/acc_std"]) == pytest.approx(0.02)
    assert (float(best["test/acc_min"]), float(best["test/acc_max"])) == (0.80, 0.84)
    assert float(other["test/acc_mean"]) == pytest.approx(0.72)
    assert float(other["test/acc_std"]) == pytest.approx(math.sqrt(0.0012))
    assert best["diff_vs_best"] == best["paired_n"] == best["diff_excludes_0"] == ""
    interval = scipy_stats.ttest_rel([0.70, 0.76, 0.70], [0.80, 0.84, 0.82]).confidence_interval()
    assert other["paired_n"] == "3" and float(other["diff_vs_best"]) == pytest.approx(-0.10)
    assert float(other["diff_lo"]) == pytest.approx(interval.low)
    assert float(other["diff_hi"]) == pytest.approx(interval.high)
    assert other["diff_excludes_0"] == "True"
    stats = [f"test/acc_{s}" for s in ("mean", "std", "min", "max")]  # objective is test/acc
    paired = ["paired_n", "diff_vs_best", "diff_lo", "diff_hi", "diff_excludes_0"]
    assert list(best) == ["setting", "seeds", "n", "failed", *stats, *paired]

    table = (tmp_path / "summary_grouped.md").read_text()
    assert table.count("\n| ") == 3 and "| lr=0.1 | 2 42 1 | 3 | 1 | 0.72 |" in table
    assert "best setting's (`lr=0.01`)" in table and "Every job: `data=imagefolder`" in table
    out = capsys.readouterr().out
    assert out.index((tmp_path / "summary.md").read_text()) < out.index(table)  # printed after

    per_job = read_csv(tmp_path / "summary.csv")
    assert per_job[0]["overrides"] == "lr=0.01 seed=2"
    lo, hi = accuracy_ci(0.84, 150)
    assert per_job[0]["test/acc_ci95"] == f"[{lo:.3f}, {hi:.3f}]"
    assert per_job[-1]["status"] == "failed" and per_job[-1]["test/acc_ci95"] == ""
    header = list(per_job[0])
    assert header.index("test/acc_ci95") == header.index("test/acc") + 1
    assert header[header.index("test/acc_ci95") + 1] == "test/macro_f1"  # present: shown
    assert "test/balanced_acc" not in header  # absent from every job: no column
    assert f"| [{lo:.3f}, {hi:.3f}] |" in (tmp_path / "summary.md").read_text()


def test_grouped_summary_with_a_loss_objective_prefers_the_lowest_mean(tmp_path: Path) -> None:
    seed_sweep(tmp_path)
    write_summary(tmp_path, "test/loss")
    best, other = read_csv(tmp_path / "summary_grouped.csv")
    assert (best["setting"], other["setting"]) == ("lr=0.01", "lr=0.1")
    assert float(best["test/loss_mean"]) == pytest.approx(0.45)
    assert float(best["test/acc_mean"]) == pytest.approx(0.82)  # test/acc described as well
    assert float(other["diff_vs_best"]) == pytest.approx(0.35)  # (0.30 + 0.30 + 0.45) / 3
    assert 0 < float(other["diff_lo"]) < 0.35 < float(other["diff_hi"])  # lr=0.1: higher loss
    assert other["diff_excludes_0"] == "True"
    assert (
        "sorted by mean test/loss (lowest first)" in (tmp_path / "summary_grouped.md").read_text()
    )


def test_grouped_summary_keeps_a_setting_whose_jobs_all_failed_last(tmp_path: Path) -> None:
    write_job(tmp_path, 0, ["lr=0.01"], {"seed": 42, "test/acc": 0.8})
    write_job(tmp_path, 1, ["lr=0.1"], None)  # killed: no result.json
    write_job(tmp_path, 2, ["lr=1.0"], {"seed": 42, "test/acc": 0.6})
    write_summary(tmp_path, "test/acc")
    rows = read_csv(tmp_path / "summary_grouped.csv")
    assert [(r["setting"], r["n"], r["failed"]) for r in rows] == [
        ("lr=0.01", "1", "0"),
        ("lr=1.0", "1", "0"),
        ("lr=0.1", "0", "1"),
    ]
    assert rows[0]["test/acc_std"] == "nan" and rows[2]["test/acc_mean"] == "nan"
    assert rows[1]["paired_n"] == "1" and float(rows[1]["diff_vs_best"]) == pytest.approx(-0.2)
    assert rows[1]["diff_lo"] == "nan" and rows[1]["diff_excludes_0"] == ""
    assert rows[2]["paired_n"] == "0"


def test_write_cv_has_the_folds_then_mean_and_std(tmp_path: Path) -> None:
    folds = [
        {"test/acc": 0.80, "test/loss": 0.6, "seed": 42},
        {"test/acc": 0.90, "test/loss": 0.4, "seed": 42},
        {"test/acc": 0.85, "test/loss": 0.5, "seed": 42},
    ]
    text = write_cv(tmp_path, folds, ["test/acc", "test/loss"])
    rows = read_csv(tmp_path / "cv.csv")
    assert [r["fold"] for r in rows] == ["0", "1", "2", "mean", "std"]
    assert list(rows[0]) == ["fold", "test/acc", "test/loss"]
    assert [float(r["test/acc"]) for r in rows[:3]] == [0.80, 0.90, 0.85]
    assert float(rows[3]["test/acc"]) == pytest.approx(0.85)
    assert float(rows[4]["test/acc"]) == pytest.approx(0.05)  # sample std (ddof=1)
    assert float(rows[3]["test/loss"]) == pytest.approx(0.5)
    assert float(rows[4]["test/loss"]) == pytest.approx(0.1)
    assert (tmp_path / "cv.md").read_text() == text
    assert text.count("\n| ") == 6  # header and 5 rows
    # 0.85 ± t(0.975, 2) * 0.05 / sqrt(3) = 0.85 ± 0.1242
    assert "test/acc: 0.85 ± 0.05 (95% interval of the mean 0.7258-0.9742)" in text
    assert "test/loss: 0.5 ± 0.1 (95% interval of the mean 0.2516-0.7484)" in text
    with pytest.raises(ValueError, match="at least one fold"):
        write_cv(tmp_path, [], ["test/acc"])
