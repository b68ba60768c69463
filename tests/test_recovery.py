"""Faults lose nothing: Ctrl-C saves, resumed runs match uninterrupted ones, writes are atomic."""

import errno
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import src.run.callbacks
from src.model.module import TransferModel
from src.run.errors import user_message
from src.train import train
from tests.conftest import CONF_DIR, FitRecord, assert_resumed, compose_cfg, tiny_overrides

TIMINGS = {"first_batch_s", "fit_s", "first_epoch_s", "mean_epoch_s", "wall_s", "max_epochs"}


def run(cfg: DictConfig, name: str, *overrides: str) -> tuple[dict, dict]:
    """Train `cfg` with `overrides` in its own dir: its result.json (less timings and
    max_epochs) and its last checkpoint."""
    replaced = {o.split("=")[0] for o in overrides}
    tiny = tiny_overrides(cfg.data.root, cfg.backbone.weights)  # tiny_cfg's calibrated backbone
    base = [a for a in tiny if a.split("=")[0] not in replaced]
    out = Path(cfg.output_dir).parent / name
    train(compose_cfg([*base, *overrides], out))
    result = json.loads((out / "result.json").read_text())
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    return {k: v for k, v in result.items() if k not in TIMINGS}, last


@pytest.mark.slow
@pytest.mark.parametrize("freeze", ["true", "false"])  # cached features; images
def test_resumed_run_matches_an_uninterrupted_one(
    tiny_cfg: DictConfig, freeze: str, fits: list[FitRecord]
) -> None:
    settings = [f"freeze={freeze}", "optimizer=adam"]
    straight, straight_last = run(tiny_cfg, "straight", *settings, "trainer.max_epochs=2")
    first, first_last = run(tiny_cfg, "killed", *settings, "trainer.max_epochs=1")
    # what a run killed (SIGKILL) during its second epoch leaves: last.ckpt of its first
    last = Path(tiny_cfg.output_dir).parent / "killed" / "checkpoints" / "last.ckpt"
    resumed, resumed_last = run(
        tiny_cfg, "resumed", *settings, "trainer.max_epochs=2", f"ckpt_path={last}"
    )
    assert straight_last["epoch"] == resumed_last["epoch"] == 1  # last.ckpt is the last epoch
    assert_resumed(fits[2], last, straight=fits[0])  # epoch 1 alone, from epoch 0's step
    assert resumed == straight
    weights, straight_weights = resumed_last["state_dict"], straight_last["state_dict"]
    assert weights.keys() == straight_weights.keys()
    for name, tensor in straight_weights.items():
        assert torch.equal(weights[name], tensor), name
    assert not torch.equal(first_last["state_dict"]["head.weight"], weights["head.weight"])


@pytest.mark.slow
def test_ctrl_c_saves_a_last_checkpoint_to_resume_from(
    tiny_cfg: DictConfig, monkeypatch: pytest.MonkeyPatch, fits: list[FitRecord]
) -> None:
    def press_ctrl_c(model: TransferModel, batch: object, batch_idx: int) -> None:
        if model.global_step == 3:  # mid first epoch (6 batches), before any checkpoint
            os.kill(os.getpid(), signal.SIGINT)

    with open_dict(tiny_cfg):  # images, not cached features: one Lightning step per minibatch
        tiny_cfg.cache_features = False

    # a terminal's Ctrl-C handler: a process a non-interactive shell starts in the background
    # (`cmd &`, as some CI runners do) inherits SIGINT ignored, and would train to the end
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with monkeypatch.context() as patch, pytest.raises(SystemExit):  # Lightning exits
            patch.setattr(TransferModel, "on_train_batch_start", press_ctrl_c, raising=False)
            train(tiny_cfg)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after the first
    last = Path(tiny_cfg.output_dir) / "checkpoints" / "last.ckpt"
    interrupted = torch.load(last, weights_only=True)
    assert interrupted["global_step"] == 3 and interrupted["epoch"] == 0
    resumed, resumed_last = run(tiny_cfg, "resumed", f"ckpt_path={last}", "cache_features=false")
    straight, _ = run(tiny_cfg, "straight", "cache_features=false")
    interrupted_fit, resumed_fit, straight_fit = fits
    assert interrupted_fit.batches == 3 and interrupted_fit.end_step is None
    # the rest of epoch 0 (Lightning skips the batches it ran), then epoch 1: no batch twice
    assert_resumed(resumed_fit, interrupted, straight=straight_fit)
    assert resumed_fit.batches == straight_fit.batches - 3
    assert resumed_last["epoch"] == 1  # both epochs ran, the interrupted one completed
    assert resumed_last["global_step"] > interrupted["global_step"]
    head, before = (
        resumed_last["state_dict"]["head.weight"],
        interrupted["state_dict"]["head.weight"],
    )
    assert not torch.equal(head, before)  # it trained on from the saved state
    assert resumed["test/acc"] == pytest.approx(straight["test/acc"], abs=2 / 12)  # close


def test_failed_checkpoint_write_keeps_the_previous_one(
    tiny_cfg: DictConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    save, calls = torch.save, []

    def full_disk(obj: object, file: object) -> None:
        if not str(getattr(file, "name", "")).endswith(".partial"):  # not a checkpoint
            return save(obj, file)
        calls.append(file)
        if len(calls) <= 1:  # epoch 0 best (last.ckpt links to it) fits, epoch 1 does not
            return save(obj, file)
        file.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(src.run.callbacks.torch, "save", full_disk)
    with pytest.raises(OSError) as caught:
        train(tiny_cfg)
    assert user_message(caught.value).startswith("disk full: No space left on device.")
    folder = Path(tiny_cfg.output_dir) / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]  # no partials
    assert torch.load(folder / "last.ckpt", weights_only=False)["epoch"] == 0


@pytest.mark.slow
def test_same_seed_same_metrics_other_seed_other_metrics(tiny_cfg: DictConfig) -> None:
    first, _ = run(tiny_cfg, "first", "seed=1")
    again, _ = run(tiny_cfg, "again", "seed=1")
    other, _ = run(tiny_cfg, "other", "seed=2")
    assert first == again
    assert first["test/loss"] != other["test/loss"]
    assert first["before/test_loss"] != other["before/test_loss"]


def test_runs_started_in_the_same_second_get_their_own_dirs() -> None:
    def run_dir() -> str:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="train", return_hydra_config=True)
        return str(cfg.hydra.run.dir)

    first, second = run_dir(), run_dir()
    while first[:-7] != second[:-7]:  # straddled a second: try again
        first, second = run_dir(), run_dir()
    assert first != second


def test_last_checkpoint_is_the_best_one_linked_only_when_that_step_was_the_best(
    tiny_cfg: DictConfig,
) -> None:
    """One write where last.ckpt and best.ckpt are the same state; a copy of its own otherwise."""
    _, last = run(tiny_cfg, "one", "trainer.max_epochs=1")
    folder = Path(tiny_cfg.output_dir).parent / "one" / "checkpoints"
    assert (folder / "last.ckpt").samefile(folder / "best.ckpt") and last["epoch"] == 0
    # an lr too small to change a prediction: epoch 1 is no better than epoch 0
    _, last = run(tiny_cfg, "flat", "trainer.max_epochs=2", "optimizer.lr=1e-12")
    folder = Path(tiny_cfg.output_dir).parent / "flat" / "checkpoints"
    best = torch.load(folder / "best.ckpt", weights_only=True)
    assert not (folder / "last.ckpt").samefile(folder / "best.ckpt")
    assert (last["epoch"], best["epoch"]) == (1, 0)
    assert not torch.equal(last["optimizer_states"][0]["state"][0]["square_avg"],
                           best["optimizer_states"][0]["state"][0]["square_avg"])  # fmt: skip


@pytest.mark.parametrize(
    ("every_s", "stop", "written"),
    [
        ("0", "trainer.max_epochs=4", [1, 2, 3]),  # every epoch not linked to a new best
        ("1e9", "trainer.max_epochs=4", [3]),  # only the last epoch's
        ("1e9", "early_stopping=1", [1]),  # the epoch that early stopping ends on
    ],
)
def test_last_checkpoint_is_written_when_due_and_when_training_ends(
    tiny_cfg: DictConfig,
    monkeypatch: pytest.MonkeyPatch,
    every_s: str,
    stop: str,
    written: list[int],
) -> None:
    """Epoch 0 is the best (an lr too small to change a weight after it) and last.ckpt links
    to it; after that last.ckpt is written when `last_ckpt_every_s` has passed, and at the end.
    Training's writes only: calibrate=false ood=false (the trust stage's write is tested with
    it, in the test above)."""
    save, writes = src.run.callbacks.AtomicCheckpointIO.save_checkpoint, []

    def recorded(io: object, checkpoint: dict, path: str, storage_options: object = None) -> None:
        writes.append((Path(path).name, checkpoint["epoch"]))
        save(io, checkpoint, path, storage_options)

    monkeypatch.setattr(src.run.callbacks.AtomicCheckpointIO, "save_checkpoint", recorded)
    _, last = run(
        tiny_cfg, "run", "trainer.max_epochs=4", stop, "optimizer.lr=1e-12",
        f"last_ckpt_every_s={every_s}", "calibrate=false", "ood=false",
    )  # fmt: skip
    assert [epoch for name, epoch in writes if name == "last.ckpt"] == written
    assert [epoch for name, epoch in writes if name == "best.ckpt"] == [0]
    assert last["epoch"] == written[-1]
