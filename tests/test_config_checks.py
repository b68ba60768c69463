"""Mistakes in the config, the checkpoint to resume or the machine stop train() before any work."""

import errno
import re
import shutil
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, OmegaConf, open_dict

from src.run.checkpoints import check_resume, read_checkpoint, run_settings
from src.run.config import check_config
from src.run.errors import UserError, exit_on_user_error, user_message
from src.train import run, train
from tests.conftest import compose_cfg, make_folder, tiny_overrides


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "freeze=maybe",
            "freeze=maybe is invalid: it must be true or false. Fix: e.g. freeze=true",
        ),
        ("batch_size=0", "batch_size=0 is invalid: it must be a whole number, at least 1"),
        ("image_size=-1", "image_size=-1 is invalid: it must be a whole number of pixels"),
        ("data.val_fraction=1.5", "data.val_fraction=1.5 is invalid: it must be a number between"),
        ("trainer.max_epochs=two", "trainer.max_epochs=two is invalid"),
        ("optimizer.lr=0", "optimizer.lr=0 is invalid: it must be a number above 0"),
        (
            "data.on_bad_image=ignore",
            "data.on_bad_image=ignore is invalid: it must be fail or skip",
        ),
        ("seed=-3", "seed=-3 is invalid"),
        ("head_fit=prob", "head_fit=prob is invalid: it must be probe or recipe"),
        ("probe.select=f1", "probe.select=f1 is invalid: it must be loss, acc or mAP"),
        ("probe.refit=all", "probe.refit=all is invalid: it must be trainval or train"),
        ("class_weights=inverse", "class_weights=inverse is invalid: it must be auto or null"),
        ("sampler=uniform", "sampler=uniform is invalid: it must be shuffle or balanced"),
        (
            "memory_format=nhwc",
            "memory_format=nhwc is invalid: it must be auto, channels_last or contiguous",
        ),
        (
            "last_ckpt_every_s=-1",
            "last_ckpt_every_s=-1 is invalid: it must be a number of seconds, at least 0",
        ),
    ],
)
def test_wrong_values_in_overrides(tiny_cfg: DictConfig, override: str, expected: str) -> None:
    cfg = compose_cfg([*tiny_overrides(tiny_cfg.data.root), override], Path(tiny_cfg.output_dir))
    with pytest.raises(UserError, match=f"^{re.escape(expected)}"):
        train(cfg)


def test_too_few_folds_stop_before_the_first_fold(tiny_cfg: DictConfig) -> None:
    cfg = compose_cfg([*tiny_overrides(tiny_cfg.data.root), "folds=1"], Path(tiny_cfg.output_dir))
    with pytest.raises(UserError, match=r"^folds=1 is invalid: it must be null or a whole number"):
        run(cfg)
    assert not (Path(tiny_cfg.output_dir) / "fold-0").exists()


def test_data_root_not_set(tmp_path: Path) -> None:
    cfg = compose_cfg(["data=imagefolder"], tmp_path / "run")
    with pytest.raises(UserError, match="data.root is not set. Fix: data.root=/path/to/folder"):
        check_config(cfg)


def test_gpu_trainer_without_a_gpu(tiny_cfg: DictConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = compose_cfg(
        [*tiny_overrides(tiny_cfg.data.root), "trainer=gpu"], Path(tiny_cfg.output_dir)
    )
    with pytest.raises(UserError, match=r"trainer.accelerator=gpu but torch finds no CUDA GPU"):
        train(cfg)


def test_output_dir_that_cannot_be_written(tiny_cfg: DictConfig, tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("")
    with open_dict(tiny_cfg):
        tiny_cfg.output_dir = str(tmp_path / "a_file" / "run")
    with pytest.raises(UserError, match=r"cannot write to the output dir .*a_file/run: Not a dir"):
        train(tiny_cfg)


def fake_checkpoint(path: Path, backbone: str, classes: list[str], freeze: bool = True) -> Path:
    """A file with the hyperparameters a TransferModel checkpoint holds, and no record of its
    run's settings (as checkpoints written before the record; compared on these)."""
    hparams = {"backbone": {"name": backbone}, "classes": classes, "freeze": freeze}
    torch.save({"hyper_parameters": hparams, "state_dict": {}}, path)
    return path


CLASSES = ["class_0", "class_1", "class_2"]  # those of the tiny folder


@pytest.mark.parametrize(
    ("checkpoint", "expected"),
    [
        ("missing", r"ckpt_path=.*missing.ckpt: no such file. Fix: the path of a checkpoint"),
        ("garbage", r"ckpt_path=.*garbage.ckpt is not a checkpoint of src.train"),
        ("vgg19", r"trained with backbone vgg19, this run has backbone mobilenet_v2\. Fix: backb"),
        ("classes", r"trained with classes \['cat', 'dog'\], this run has classes \['class_0'"),
        ("unfrozen", r"trained with freeze false, this run has freeze true. Fix: freeze=false"),
    ],
)
def test_checkpoint_to_resume(
    tiny_cfg: DictConfig, tmp_path: Path, checkpoint: str, expected: str
) -> None:
    path = tmp_path / f"{checkpoint}.ckpt"
    if checkpoint == "garbage":
        path.write_bytes(b"half a checkpoint")
    elif checkpoint != "missing":
        backbone = "vgg19" if checkpoint == "vgg19" else "mobilenet_v2"
        classes = ["cat", "dog"] if checkpoint == "classes" else CLASSES
        fake_checkpoint(path, backbone, classes, freeze=checkpoint != "unfrozen")
    with open_dict(tiny_cfg):
        tiny_cfg.ckpt_path = str(path)
    with pytest.raises(UserError, match=expected):
        train(tiny_cfg)


def recorded_checkpoint(path: Path, cfg: DictConfig) -> Path:
    """A checkpoint of a run of `cfg` on CLASSES as train writes it: its hyperparameters and the
    `lightning_transfer` record of its settings."""
    hparams = {
        "backbone": {"name": cfg.backbone.name},
        "classes": CLASSES,
        "freeze": cfg.freeze,
        "finetune": OmegaConf.to_container(cfg.finetune, resolve=True),
    }
    record = {"version": 2, "settings": run_settings(cfg)}
    torch.save({"state_dict": {}, "hyper_parameters": hparams, "lightning_transfer": record}, path)
    return path


def resume(tmp_path: Path, trained: list[str], now: list[str]) -> None:
    """check_resume of a run with overrides `now` from a checkpoint of one with `trained`."""
    base = tiny_overrides(tmp_path / "data")
    path = recorded_checkpoint(tmp_path / "last.ckpt", compose_cfg([*base, *trained], tmp_path))
    check_resume(str(path), compose_cfg([*base, *now], tmp_path), CLASSES)


STAGED = "finetune=staged"
CYCLE = "scheduler=onecycle"


@pytest.mark.parametrize(
    ("trained", "now", "expected"),
    [
        ([STAGED], [], "finetune staged, this run has finetune none. Fix: finetune=staged"),
        (
            [STAGED],
            [STAGED, "finetune.unfreeze_at_epoch=1"],
            "finetune.unfreeze_at_epoch 2, this run has finetune.unfreeze_at_epoch 1. "
            "Fix: finetune.unfreeze_at_epoch=2",
        ),
        ([STAGED], [STAGED, "finetune.warmup_epochs=0"], "finetune.warmup_epochs 1, this run"),
        ([STAGED], [STAGED, "finetune.backbone_lr_scale=1"], "finetune.backbone_lr_scale 0.1"),
        ([STAGED], [STAGED, "finetune.bn=train"], "finetune.bn frozen, this run has finetune.bn"),
        (["finetune=full"], ["finetune=full", "finetune.backbone_lr_scale=1"], "finetune.back"),
        (["freeze=false"], [], "freeze false, this run has freeze true. Fix: freeze=false"),
        (["scheduler=cosine"], [], "scheduler cosine, this run has scheduler none. Fix: schedu"),
        (
            ["scheduler=cosine"],
            ["scheduler=cosine", "trainer.max_epochs=3"],
            "trainer.max_epochs 2, this run has trainer.max_epochs 3 (scheduler=cosine is built "
            "for the run's length). Fix: trainer.max_epochs=2, or ckpt_path=null to start afresh",
        ),
        ([CYCLE], [CYCLE, "trainer.max_epochs=1"], "trainer.max_epochs 2, this run has trainer"),
    ],
)
def test_resume_with_other_settings(
    tmp_path: Path, trained: list[str], now: list[str], expected: str
) -> None:
    with pytest.raises(
        UserError, match=f"^ckpt_path=.*last.ckpt was trained with {re.escape(expected)}"
    ):
        resume(tmp_path, trained, now)


@pytest.mark.parametrize(
    ("trained", "now"),
    [
        (["scheduler=plateau"], ["scheduler=plateau", "trainer.max_epochs=5"]),  # per epoch
        ([], ["trainer.max_epochs=5", "optimizer.lr=0.01", "batch_size=8"]),
        ([STAGED, "freeze=true"], [STAGED, "freeze=false"]),  # staged ignores freeze
    ],
)
def test_resume_with_settings_that_may_change(
    tmp_path: Path, trained: list[str], now: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    resume(tmp_path, trained, now)
    assert not caplog.records


def test_checkpoint_from_before_the_record_is_checked_on_its_hyperparameters(
    tiny_cfg: DictConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = fake_checkpoint(tmp_path / "old.ckpt", "mobilenet_v2", CLASSES)
    check_resume(str(path), tiny_cfg, CLASSES)
    [record] = caplog.records
    assert record.levelname == "WARNING"
    assert record.getMessage() == (
        f"ckpt_path={path} predates the resume check of scheduler: it resumes with this run's "
        "scheduler=none, which must be what it was trained with (see its run dir's "
        ".hydra/config.yaml), or ckpt_path=null to start afresh"
    )


def test_onecycle_resumed_for_more_epochs_stops_before_training(
    tiny_cfg: DictConfig, tmp_path: Path
) -> None:
    """A 1-epoch onecycle run resumed with trainer.max_epochs=2: the restored OneCycleLR keeps
    its total steps and raises on the first step past them; the check stops the run first."""
    base = [*tiny_overrides(tiny_cfg.data.root), CYCLE]
    first = compose_cfg([*base, "trainer.max_epochs=1"], tmp_path / "first")
    train(first)
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    unrecorded = read_checkpoint(last)  # as written before the record: the check cannot tell
    del unrecorded["lightning_transfer"]
    torch.save(unrecorded, tmp_path / "old.ckpt")
    longer = [*base, "trainer.max_epochs=2"]
    with pytest.raises(ValueError, match=r"Tried to step \d+ times. The specified number of total"):
        train(compose_cfg([*longer, f"ckpt_path={tmp_path / 'old.ckpt'}"], tmp_path / "old"))
    expected = "trained with trainer.max_epochs 1, this run has trainer.max_epochs 2 (scheduler="
    with pytest.raises(UserError, match=re.escape(expected)):
        train(compose_cfg([*longer, f"ckpt_path={last}"], tmp_path / "resumed"))
    assert not (tmp_path / "resumed" / "checkpoints").exists()


def test_folder_problem_raised_inside_instantiate_is_one_line(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", per_class=2)
    shutil.rmtree(root / "training")
    cfg = compose_cfg(["data=imagefolder", f"data.root={root}"], tmp_path / "run")
    with pytest.raises(Exception) as caught:  # Hydra wraps it in an InstantiationException
        train(cfg)
    assert user_message(caught.value).startswith("no training folder")


def test_messages_for_hydra_and_disk_errors() -> None:
    unknown = MissingConfigException("...", "backbone/resnet", ["mobilenet_v2", "vgg19"])
    assert user_message(unknown) == (
        "unknown backbone 'resnet'. Fix: backbone=one of mobilenet_v2, vgg19"
    )
    typo = ConfigCompositionException(
        "Could not override 'bakbone'.\nTo append to your config use +bakbone=x"
    )
    assert user_message(typo) == (
        "Could not override 'bakbone'. To append to your config use +bakbone=x"
    )
    full = OSError(errno.ENOSPC, "No space left on device", "out/last.ckpt")
    assert user_message(full).startswith("disk full: No space left on device (out/last.ckpt).")
    assert user_message(ValueError("a bug")) is None  # bugs keep their traceback


def test_wrapper_prints_one_line_and_exits_2(capsys: pytest.CaptureFixture) -> None:
    @exit_on_user_error
    def full_disk() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(SystemExit) as caught:
        full_disk()
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: disk full: No space left on device. Fix:")
    assert err.count("\n") == 1
