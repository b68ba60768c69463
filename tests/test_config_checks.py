"""Mistakes in the config, the checkpoint to resume or the machine stop train() before any work."""

import errno
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg, make_folder, tiny_overrides
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, open_dict

from src.checks import check_config
from src.errors import UserError, exit_on_user_error, user_message
from src.train import train


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
    ],
)
def test_wrong_values_in_overrides(tiny_cfg: DictConfig, override: str, expected: str) -> None:
    cfg = compose_cfg([*tiny_overrides(tiny_cfg.data.root), override], Path(tiny_cfg.output_dir))
    with pytest.raises(UserError, match=f"^{re.escape(expected)}"):
        train(cfg)


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
    """A file with the hyperparameters a TransferModel checkpoint holds."""
    hparams = {"backbone": {"name": backbone}, "classes": classes, "freeze": freeze}
    torch.save({"hyper_parameters": hparams, "state_dict": {}}, path)
    return path


CLASSES = ["class_0", "class_1", "class_2"]  # those of the tiny folder


@pytest.mark.parametrize(
    ("checkpoint", "expected"),
    [
        ("missing", r"ckpt_path=.*missing.ckpt: no such file. Fix: the path of a checkpoint"),
        ("garbage", r"ckpt_path=.*garbage.ckpt is not a checkpoint of this trainer"),
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
