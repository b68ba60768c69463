"""Sweeps: the multirun summary, a failed job, the sweep configs."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from src.report.summary import COLUMNS, write_summary
from src.run.errors import error_line
from tests.conftest import CONF_DIR, make_folder

REPO = Path(__file__).resolve().parents[1]


def hparams_in_events(run_dir: Path) -> tuple[dict[str, Any], set[str]]:
    """What TensorBoard's HPARAMS tab reads from a run dir: hyperparameters and metric names."""
    hparams: dict[str, Any] = {}
    metrics: set[str] = set()
    for path in run_dir.glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name != "hparams":
                    continue
                data = HParamsPluginData.FromString(value.metadata.plugin_data.content)
                metrics |= {info.name.tag for info in data.experiment.metric_infos}
                for name, v in data.session_start_info.hparams.items():
                    hparams[name] = getattr(v, v.WhichOneof("kind"))
    return hparams, metrics


@pytest.mark.slow
def test_multirun_summary_has_every_job_best_first_and_the_failed_one_last(tmp_path: Path) -> None:
    make_folder(tmp_path / "data", per_class=8, validation=4)
    command = [sys.executable, "-m", "src.train", "-m", "batch_size=0,1,3,8", "data=imagefolder"]
    command += ["data.root=data", "image_size=32", "backbone.weights=null", "trainer=cpu"]
    command += ["trainer.max_epochs=1", "precision=32-true", "objective=test/loss"]
    run = subprocess.run(
        [*command, "hydra.sweep.dir=sweep"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 1, run.stderr[-3000:]
    assert "error: 1 of 4 jobs failed" in run.stderr
    sweep = tmp_path / "sweep"
    with (sweep / "summary.csv").open() as file:
        reader = csv.DictReader(file)
        rows = list(reader)
    assert [name for name in reader.fieldnames if name in COLUMNS] == COLUMNS  # + optional ones
    assert [row["overrides"] for row in rows][-1] == "batch_size=0"  # job 0, but it failed
    assert sorted(row["overrides"] for row in rows) == [f"batch_size={b}" for b in (0, 1, 3, 8)]
    done, failed = rows[:3], rows[3]
    assert [row["status"] for row in done] == ["completed"] * 3
    losses = [float(row["test/loss"]) for row in done]
    assert losses == sorted(losses)  # the objective is a loss: lowest first
    for row in done:
        assert (row["backbone"], row["freeze"], row["optimizer"]) == (
            "mobilenet_v2",
            "True",
            "RMSprop",
        )
        assert (int(row["trainable_params"]), int(row["total_params"])) == (3_843, 2_227_715)
        assert float(row["lr"]) == 1e-4 and row["best_epoch"] == "0" and row["error"] == ""
        assert 0 <= float(row["test/acc"]) <= 1 and float(row["first_epoch_s"]) > 0
    assert failed["status"] == "failed" and failed["backbone"] == "mobilenet_v2"
    assert "batch_size" in failed["error"] and "\n" not in failed["error"]  # one line
    assert failed["test/acc"] == "" and float(failed["wall_s"]) > 0
    table = (sweep / "summary.md").read_text()
    assert table in run.stdout and table.count("\n| ") == 5  # header and 4 jobs
    assert "Every job: `data=imagefolder data.root=data" in table
    with (sweep / "summary_grouped.csv").open() as file:
        grouped = sorted((g["setting"], g["n"], g["failed"]) for g in csv.DictReader(file))
    completed = [(f"batch_size={b}", "1", "0") for b in (1, 3, 8)]  # (setting, n, failed)
    assert grouped == [("batch_size=0", "0", "1"), *completed]
    grouped_table = (sweep / "summary_grouped.md").read_text()
    assert run.stdout.index(table) < run.stdout.index(grouped_table)  # printed after

    runs = {str(p.parent.relative_to(sweep)): p.parent for p in sweep.rglob("result.json")}
    assert len(runs) == 4 and all(name.startswith("backbone.weights=null,") for name in runs)
    run_dir = next(d for name, d in runs.items() if ",batch_size=3," in name)  # named by overrides
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    hparams, metrics = hparams_in_events(run_dir)
    assert hparams["batch_size"] == 3 and hparams["backbone"] == "mobilenet_v2"
    assert {"test/acc", "test/loss", "before/test_acc"} <= metrics
    failed_dir = next(d for name, d in runs.items() if ",batch_size=0," in name)
    assert f"job failed: {failed['error']}" in (failed_dir / "train.log").read_text()


def write_job(sweep: Path, num: int, overrides: list[str], result: dict[str, Any] | None) -> None:
    """A finished job's run dir as Hydra and train() leave it."""
    run_dir = sweep / ",".join(overrides)
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run_dir / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    num: {num}\n")
    if result is not None:
        (run_dir / "result.json").write_text(json.dumps(result))


@pytest.mark.parametrize(
    ("objective", "order"),
    [
        ("test/acc", ["lr=0.1", "lr=0.01", "lr=0.001"]),
        ("test/loss", ["lr=0.01", "lr=0.001", "lr=0.1"]),
    ],
)
def test_summary_sorts_by_the_objective_and_keeps_jobs_without_a_result(
    tmp_path: Path, objective: str, order: list[str]
) -> None:
    write_job(tmp_path, 0, ["lr=0.001", "seed=1"], {"test/acc": 0.5, "test/loss": 0.9})
    write_job(tmp_path, 1, ["lr=0.01", "seed=1"], {"test/acc": 0.7, "test/loss": 0.8})
    write_job(tmp_path, 2, ["lr=0.1", "seed=1"], {"test/acc": 0.9, "test/loss": 1.2})
    write_job(tmp_path, 3, ["lr=1.0", "seed=1"], None)  # killed before it wrote its result
    rows = write_summary(tmp_path, objective)
    assert [row["overrides"] for row in rows] == [*order, "lr=1.0"]
    assert [row["job"] for row in rows][-1] == 3 and rows[-1]["status"] == "no result"
    assert "Every job: `seed=1`" in (tmp_path / "summary.md").read_text()


def test_summary_adds_an_objective_that_is_not_a_standard_column(tmp_path: Path) -> None:
    write_job(tmp_path, 0, ["a=1"], {"train/acc": 0.2})
    write_job(tmp_path, 1, ["a=2"], {"train/acc": 0.4})
    rows = write_summary(tmp_path, "train/acc")
    assert [row["overrides"] for row in rows] == ["a=2", "a=1"]
    header = (tmp_path / "summary.csv").read_text().splitlines()[0].split(",")
    assert header[header.index("best_epoch") - 1] == "train/acc"


def test_error_line_is_the_user_error_behind_hydra_instantiate(tmp_path: Path) -> None:
    with pytest.raises(InstantiationException) as caught:
        instantiate({"_target_": "src.data.ImageFolderData", "root": str(tmp_path)})
    assert error_line(caught.value).startswith(f"no training folder {tmp_path}/training. Fix:")
    assert error_line(ValueError("bad value\nmore detail")) == "ValueError: bad value"
    assert error_line(KeyError()) == "KeyError"


def compose_with_hydra(overrides: list[str]) -> DictConfig:
    """The root config with `overrides`, including the `hydra` node (launcher, sweeper)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize(
    ("name", "backbone", "freeze"),
    [
        ("blog_vgg19_frozen", "vgg19", True),
        ("blog_mobilenet_v2_frozen", "mobilenet_v2", True),
        ("blog_mobilenet_v2_unfrozen", "mobilenet_v2", False),
    ],
)
def test_experiments_have_the_published_settings(name: str, backbone: str, freeze: bool) -> None:
    cfg = compose_with_hydra([f"experiment={name}"])
    assert (cfg.backbone.name, cfg.backbone.weights, cfg.freeze) == (
        backbone,
        "IMAGENET1K_V1",
        freeze,
    )
    assert (cfg.optimizer._target_, cfg.optimizer.lr) == ("torch.optim.RMSprop", 1e-4)
    assert (cfg.trainer.max_epochs, cfg.image_size, cfg.batch_size) == (50, 160, 32)
    assert cfg.head_fit == "recipe"  # the published fit: RMSprop's 50 epochs


def test_offline_experiments_sweep_with_freeze_overrides() -> None:
    lite0 = compose_with_hydra(["experiment=offline_efficientnet_lite0", "freeze=false"])
    assert (lite0.backbone.name, lite0.backbone.weights, lite0.freeze) == (
        "tf_efficientnet_lite0",
        "imagenet",
        False,
    )
    mobilenet = compose_with_hydra(["experiment=offline_mobilenet_v2"])
    assert (mobilenet.backbone.name, mobilenet.backbone.weights) == ("mobilenet_v2", None)
    assert (mobilenet.optimizer.lr, mobilenet.trainer.max_epochs) == (1e-4, 50)


def test_launchers_ddp_and_search_configs() -> None:
    parallel = compose_with_hydra(["hydra/launcher=parallel"]).hydra.launcher
    assert parallel._target_.endswith("JoblibLauncher") and parallel.n_jobs == 2
    slurm = compose_with_hydra(["hydra/launcher=slurm"]).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.gpus_per_node == 1
    assert compose_with_hydra(["trainer=ddp"]).trainer.strategy == "ddp_spawn"
    search = compose_with_hydra(["hparams_search=optuna"])
    assert search.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert search.objective == "val/acc" and search.hydra.sweeper.direction == "maximize"
    assert set(search.hydra.sweeper.params) == {"optimizer", "optimizer.lr"}
    assert search.hydra.sweeper.sampler.seed == search.seed


@pytest.mark.slow
def test_parallel_jobs_with_the_same_frozen_backbone_extract_once(tmp_path: Path) -> None:
    """Two jobs side by side (hydra/launcher=parallel) share a feature cache key: the lock makes
    one extract (VGG19 at 128 px: seconds, long enough for the other to find no file yet) and
    the other wait and read its file."""
    root = make_folder(tmp_path / "data", per_class=12, size=128, validation=2)
    command = [
        sys.executable, "-m", "src.train", "-m", "hydra/launcher=parallel", "backbone=vgg19",
        "backbone.weights=null", "data=imagefolder", f"data.root={root}", "image_size=128",
        "trainer=cpu", "trainer.max_epochs=1", "logger=none", "precision=32-true",
        "optimizer.lr=1e-3,1e-4", f"cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", f"data.scan_cache={tmp_path / 'scan'}",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    logs = "".join(p.read_text() for p in (tmp_path / "sweep").rglob("train.log"))
    assert logs.count("features cached in") == 1
    assert logs.count("features from cache") == 1
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
