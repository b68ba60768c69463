"""`python -m src.train` with a mistake prints one `error: ...` line, exits 2, no traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CASES = {  # name -> (overrides, the start of the line users see)
    "backbone": (
        ["backbone=resnet5"],
        "unknown backbone 'resnet5'. Fix: backbone=one of convnext_tiny, efficientnet_b0, "
        "efficientnet_lite0, mobilenet_v2, mobilenet_v3_large, resnet50, timm, torchvision, vgg19, "
        "vit_b_16",
    ),
    "backbone_name": (
        ["backbone=torchvision", "backbone.name=resnet5O", "hydra.run.dir={tmp}/run2"],
        "unknown torchvision model 'resnet5O' (did you mean resnet50",
    ),
    "optimizer": (
        ["optimizer=adm"],
        "unknown optimizer 'adm'. Fix: optimizer=one of adam, adamw, rmsprop, sgd",
    ),
    "root": (
        ["data=imagefolder", "data.root={tmp}/nowhere", "hydra.run.dir={tmp}/run"],
        "data.root={tmp}/nowhere is not a folder",
    ),
    "run_dir": (
        ["hydra.run.dir={tmp}/a_file/run"],
        "cannot write: Not a directory ({tmp}/a_file/run). Fix:",
    ),
}
OTHER = ["src.eval", "src.predict", "src.explain", "src.export"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, str]]:
    """Every case's (exit code, stderr, tmp dir), all run at once in their own processes; plus
    `full`, the unknown backbone with HYDRA_FULL_ERROR=1, and each OTHER command given `bogus=1`."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "a_file").write_text("")
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    commands = {
        name: (["src.train", *(a.format(tmp=tmp) for a in args)], env)
        for name, (args, _) in CASES.items()
    }
    commands["full"] = (["src.train", "backbone=resnet5"], env | {"HYDRA_FULL_ERROR": "1"})
    commands |= {command: ([command, "bogus=1"], env) for command in OTHER}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", *args],
            cwd=REPO,
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (args, environ) in commands.items()
    }
    return {name: (p.wait(timeout=300), p.communicate()[1], str(tmp)) for name, p in procs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_one_line_exit_2(runs: dict[str, tuple[int, str, str]], name: str) -> None:
    code, stderr, tmp = runs[name]
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert len(lines) == 1 and lines[0].startswith("error: " + CASES[name][1].format(tmp=tmp))


@pytest.mark.slow
def test_hydra_full_error_shows_the_traceback(runs: dict[str, tuple[int, str, str]]) -> None:
    code, stderr, _ = runs["full"]
    assert code == 1 and "Traceback" in stderr and "MissingConfigException" in stderr


@pytest.mark.slow
@pytest.mark.parametrize("command", OTHER)
def test_other_commands_report_config_errors_on_one_line(
    runs: dict[str, tuple[int, str, str]], command: str
) -> None:
    code, stderr, _ = runs[command]
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert lines == ["error: Could not override 'bogus'. To append to your config use +bogus=1"]
