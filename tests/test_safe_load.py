"""Checkpoints run no code: a crafted one is refused by every command and by Lightning's own
loads, before anything in it runs; this trainer's real checkpoints still load and resume."""

import json
import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from src.model.inference import logits_of_files
from src.model.module import TransferModel
from src.model.network import load_model
from src.run.callbacks import AtomicCheckpointIO
from src.run.checkpoints import read_checkpoint, run_settings
from src.run.errors import UserError
from src.train import build_model, train
from tests.conftest import FitRecord, compose_cfg, make_folder, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
REFUSED = "holds objects this trainer's checkpoints never contain ({}); it was refused and nothing"


class Touch:
    """Unpickling it creates the file `marker`: what the code in a crafted checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


class MakeDirs(Touch):
    """The same through a module torch blocks outright (os): creates the folder `marker`."""

    def __reduce__(self) -> tuple:
        return (os.makedirs, (str(self.marker),))


def crafted(folder: Path, payload: type[Touch] = Touch) -> tuple[Path, Path]:
    """`folder`/best.ckpt, shaped like a checkpoint, whose unpickling would create `folder`/marker;
    returns both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    path, marker = folder / "best.ckpt", folder / "marker"
    hparams = {"backbone": {"name": "mobilenet_v2"}, "classes": ["a", "b"], "x": payload(marker)}
    torch.save({"state_dict": {}, "hyper_parameters": hparams}, path)
    return path, marker


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny image folder that every test here shares."""
    return make_folder(tmp_path_factory.mktemp("data"), per_class=8, validation=4)


def test_the_crafted_file_runs_its_code_when_fully_unpickled(tmp_path: Path) -> None:
    """The threat is real: torch.load(weights_only=False), as before, creates the marker."""
    path, marker = crafted(tmp_path)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize(("payload", "named"), [(Touch, "getattr"), (MakeDirs, "os.makedirs")])
def test_read_checkpoint_refuses_a_crafted_file_without_running_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, payload: type[Touch], named: str
) -> None:
    path, marker = crafted(tmp_path, payload)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # cannot switch the check off
    for mmap in (False, True):
        with pytest.raises(UserError) as caught:
            read_checkpoint(path, mmap=mmap)
        assert str(caught.value) == (
            f"{path} {REFUSED.format(named)} in it was run. Fix: give a .ckpt file written by "
            "src.train"
        )
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["truncated", "empty", "pickle", "zip", "state_dict", "folder"])
def test_broken_or_foreign_files_are_one_clear_line(tmp_path: Path, kind: str) -> None:
    path, marker = tmp_path / "x.ckpt", tmp_path / "marker"
    real = tmp_path / "real.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "epoch": 0}, real)
    if kind == "truncated":
        path.write_bytes(real.read_bytes()[:-300])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "pickle":  # a plain pickle is no torch.save file: never unpickled
        path.write_bytes(pickle.dumps({"state_dict": Touch(marker)}))
    elif kind == "zip":  # a zip archive, not torch's
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("readme.txt", "images")
    elif kind == "state_dict":  # a bare state dict, such as backbone weights
        torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    else:
        path = tmp_path
    why = {
        "zip": "RuntimeError: ",  # then torch's own words
        "state_dict": "it holds no 'state_dict'",
        "folder": "no such file",
    }.get(kind, "not a zip archive as torch.save writes: truncated, empty or another format")
    with pytest.raises(UserError) as caught:
        read_checkpoint(path)
    message = str(caught.value)
    assert message.startswith(f"{path} is not a checkpoint of src.train ({why}")
    assert message.endswith("). Fix: give a .ckpt file written by src.train")
    assert "\n" not in message
    assert not marker.exists()


def test_lightning_loads_refuse_a_crafted_file(root: Path, tmp_path: Path) -> None:
    """`fit(ckpt_path=...)` and `test(ckpt_path=...)` read through AtomicCheckpointIO, even
    when they ask for a full unpickle."""
    path, marker = crafted(tmp_path / "crafted")
    with pytest.raises(UserError, match="getattr"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)
    cfg = compose_cfg(tiny_overrides(root), tmp_path / "run")
    data = instantiate(cfg.data)
    model = build_model(cfg, data)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        plugins=[AtomicCheckpointIO()],
    )
    with pytest.raises(UserError, match=re.escape(REFUSED.format("getattr"))):
        trainer.test(model, data, ckpt_path=path, verbose=False)
    with pytest.raises(UserError, match="getattr"):
        trainer.fit(model, data, ckpt_path=path)
    assert not marker.exists()


COMMANDS = {  # module -> its overrides besides ckpt_path ({root}: the tiny folder)
    "train": [*tiny_overrides(Path("{root}")), "trainer.max_epochs=1"],
    "eval": ["data=imagefolder", "data.root={root}", "logger=none"],
    "predict": ["inputs={image}"],
    "explain": ["inputs={image}"],
    "export": [],
}


@pytest.fixture(scope="module")
def refused(root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """Each command run on its own crafted best.ckpt, in parallel processes: (exit status,
    stderr, checkpoint, marker)."""
    tmp = tmp_path_factory.mktemp("cli")
    image = next((root / "training" / "class_0").iterdir())
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    procs = {}
    for command, overrides in COMMANDS.items():
        path, marker = crafted(tmp / command)
        args = [o.format(root=root, image=image) for o in overrides]
        procs[command] = (
            subprocess.Popen(
                [sys.executable, "-m", f"src.{command}", *args, f"ckpt_path={path}"]
                + [f"hydra.run.dir={tmp / command / 'run'}"],
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            ),
            path,
            marker,
        )
    return {
        command: (proc.wait(timeout=300), proc.communicate()[1], path, marker)
        for command, (proc, path, marker) in procs.items()
    }


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_refuses_a_crafted_checkpoint(refused: dict, command: str) -> None:
    code, stderr, path, marker = refused[command]
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    prefix = "ckpt_path=" if command == "train" else ""  # train's resume check names the key
    assert lines[0].startswith(f"error: {prefix}{path} {REFUSED.format('getattr')}"), stderr
    assert not marker.exists()
    if command == "train":  # refused before any training
        assert not (path.parent / "run" / "checkpoints").exists()


TRAINED = ["scheduler=plateau", "early_stopping=3", "optimizer=adam"]  # and their states


@pytest.fixture(scope="module")
def trained(root: Path, tmp_path_factory: pytest.TempPathFactory) -> DictConfig:
    """A real 2-epoch run with the TRAINED settings (its checkpoints hold Adam's, the
    scheduler's, EarlyStopping's and RunCheckpoint's states), recording its `run_settings` as
    the LightningModule hook will."""
    cfg = compose_cfg([*tiny_overrides(root), *TRAINED], tmp_path_factory.mktemp("run"))
    train(cfg)
    return cfg


def test_real_checkpoints_load(trained: DictConfig) -> None:
    folder = Path(trained.output_dir) / "checkpoints"
    for name in ("best.ckpt", "last.ckpt"):
        checkpoint = read_checkpoint(folder / name, mmap=True)
        assert checkpoint["lightning_transfer"]["settings"] == run_settings(trained)
        assert checkpoint["lr_schedulers"] and checkpoint["optimizer_states"][0]["state"]
    assert read_checkpoint(folder / "last.ckpt")["epoch"] == 1
    model = load_model(folder / "best.ckpt")  # what eval, predict, explain and export use
    trained_model = TransferModel(**read_checkpoint(folder / "best.ckpt")["hyper_parameters"])
    assert model.state_dict().keys() == trained_model.state_dict().keys()
    assert model.classes == trained_model.classes and not model.training


def test_resume_from_a_real_checkpoint(
    trained: DictConfig, root: Path, tmp_path: Path, fits: list[FitRecord]
) -> None:
    """A third epoch, through check_resume, Lightning's restore, test("best") and the read of
    the best checkpoint: only epoch 2 runs, from the saved step, and the result is best.ckpt's."""
    last = Path(trained.output_dir) / "checkpoints" / "last.ckpt"
    saved = read_checkpoint(last)
    overrides = [*tiny_overrides(root), *TRAINED, "trainer.max_epochs=3", f"ckpt_path={last}"]
    cfg = compose_cfg(overrides, tmp_path)
    train(cfg)
    (resumed,) = fits
    assert resumed.start_step == saved["global_step"] > 0 and resumed.epochs == [2]
    assert resumed.end_step == saved["global_step"] * 3 // 2  # 2 epochs saved, one more run
    last = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 2
    result = json.loads((tmp_path / "result.json").read_text())
    # the best so far: this run's, or the first run's when epoch 2 was no better
    (best_path,) = [s["best_model_path"] for s in last["callbacks"].values() if "dirpath" in s]
    assert result["best_epoch"] == read_checkpoint(best_path)["epoch"]
    test = instantiate(cfg.data).test_split  # the validation folder
    scores, _ = logits_of_files(load_model(best_path), test.paths, torch.device("cpu"))
    accuracy = (scores.argmax(1) == torch.tensor(test.labels)).float().mean().item()
    assert result["test/acc"] == pytest.approx(accuracy, abs=1e-6)  # the best epoch's, tested
