"""The GPU path, checked without a GPU: device and strategy choice on a mocked multi-GPU machine,
precision validation and inputs, batch augmentation on the device, the figures' model, the
bucketed gradient reduction, compilation per rank, `first_batch_s`, and the prepared bench."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from omegaconf import open_dict
from torchvision.transforms import v2

import src.report.figures
import src.run.devices
import src.run.runtime
from src.data.module import ImageFolderData
from src.data.sampling import EpochIndex
from src.model.finetune import reduce_gradients
from src.model.module import TransferModel
from src.model.network import TransferNet
from src.run.config import check_config
from src.run.devices import compile_backbone, trainer_settings
from src.run.errors import UserError
from src.run.runtime import resolve_precision
from src.train import train
from tests.conftest import calibrated_mobilenet_v2, compose_cfg, make_folder, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = {
    "_target_": "src.backbones.torchvision_backbone",
    "name": "mobilenet_v2",
    "weights": None,
}
AUGMENT = v2.Compose(
    [
        v2.RandomResizedCrop(16, scale=(0.3, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(0.3, 0.3, 0.3, 0.05),
    ]
)


@pytest.fixture
def gpus(monkeypatch: pytest.MonkeyPatch):
    """A machine with `n` GPUs (by the count Lightning and src.run.devices read), not launched
    by torchrun or srun."""
    for name in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)

    def machine(n: int) -> None:
        monkeypatch.setattr(src.run.devices, "num_cuda_devices", lambda: n)

    return machine


def test_several_gpus_train_in_spawned_ranks_not_a_rerun_command(gpus, tmp_path) -> None:
    gpus(4)
    cfg = compose_cfg(["trainer=default"], tmp_path)
    settings = trainer_settings(cfg)
    assert settings == {"strategy": "ddp_spawn", "deterministic": False, "benchmark": True}
    with open_dict(cfg):
        cfg.trainer.devices = 1
    assert trainer_settings(cfg)["strategy"] == "auto"  # one GPU: no processes to start
    with open_dict(cfg):
        cfg.trainer.devices, cfg.trainer.strategy = "auto", "ddp"
    assert trainer_settings(cfg)["strategy"] == "ddp"  # a strategy set by hand stays


def test_ranks_started_by_torchrun_keep_lightnings_choice(gpus, tmp_path, monkeypatch) -> None:
    gpus(4)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert trainer_settings(compose_cfg(["trainer=default"], tmp_path))["strategy"] == "auto"


def test_the_chosen_strategy_launches_without_the_command_line(tmp_path) -> None:
    """ddp_spawn's launcher starts ranks in memory (the CPU stands in for the GPUs)."""
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False)
    assert isinstance(trainer.strategy.launcher, _MultiProcessingLauncher)
    assert trainer.strategy.launcher._start_method == "spawn"


def test_a_cpu_stays_deterministic(gpus, tmp_path) -> None:
    gpus(0)
    settings = trainer_settings(compose_cfg(["trainer=default"], tmp_path))
    assert settings == {"strategy": "auto", "deterministic": True}


def test_precision_auto_reads_the_gpu_without_initialising_cuda(monkeypatch) -> None:
    def initialises(*args: object) -> None:
        raise AssertionError("torch.cuda.get_device_capability initialises CUDA")

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", initialises)
    monkeypatch.setattr(src.run.runtime, "nvml_capability", lambda: (9, 0))
    assert resolve_precision("auto", "gpu") == "bf16-mixed"
    monkeypatch.setattr(src.run.runtime, "nvml_capability", lambda: (7, 5))
    assert resolve_precision("auto", "gpu") == "32-true"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("precision", "fp16"),
        ("precision", "bf16"),
        ("compile", "yes"),
        ("trainer.deterministic", 2),
    ],
)
def test_invalid_device_settings_are_one_line_errors(key, value, image_root, tmp_path) -> None:
    cfg = compose_cfg(tiny_overrides(image_root), tmp_path)
    with open_dict(cfg):
        node, _, leaf = key.rpartition(".")
        (cfg[node] if node else cfg)[leaf] = value
    with pytest.raises(UserError, match=rf"^{key}={value} is invalid: .*Fix: ") as error:
        check_config(cfg)
    assert "\n" not in str(error.value)


def test_true_precisions_take_uint8_images_and_float32_features() -> None:
    torch.manual_seed(0)
    model = TransferNet(BACKBONE, ["a", "b"], 32).eval().to(torch.bfloat16)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        logits = model.logits(images)
        from_features = model.logits(torch.randn(2, model.head.in_features))  # cached: float32
    assert logits.dtype == from_features.dtype == torch.bfloat16
    assert torch.isfinite(logits.float()).all()


def device_batches(data: ImageFolderData, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """An epoch's training batches through the data module's batch hooks, as Lightning calls
    them around the transfer (the CPU is the device here)."""
    loader = data.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return [
        data.on_after_batch_transfer(data.on_before_batch_transfer(batch, 0), 0) for batch in loader
    ]


def test_batch_augmentation_on_the_device_gives_the_per_image_batches(tmp_path) -> None:
    """On the CPU device the batches are the per-image path's exactly (the documented property:
    same seeded parameters; a GPU's kernels then round the pixels their way)."""
    root = make_folder(tmp_path / "d", per_class=5)
    made = {
        where: ImageFolderData(
            str(root), 16, 4, seed=3, train_transform=AUGMENT, in_memory=True, augment_on=where
        )
        for where in ("cpu", "device")
    }
    for data in made.values():
        data.setup()
    assert made["device"].datasets["train"].defer and not made["cpu"].datasets["train"].defer
    for epoch in (0, 1):
        loader = made["cpu"].train_dataloader()
        loader.sampler.set_epoch(epoch)
        per_image = list(loader)
        on_device = device_batches(made["device"], epoch)
        assert len(per_image) == len(on_device) >= 2
        for (x, y), (dx, dy) in zip(per_image, on_device, strict=True):
            assert torch.equal(x, dx) and torch.equal(y, dy)
    first, again = device_batches(made["device"], 0), device_batches(made["device"], 1)
    assert not torch.equal(first[0][0], again[0][0])  # augmentation differs per epoch


def test_augmentation_leaves_the_global_and_cuda_generators_alone(tmp_path, monkeypatch) -> None:
    def reseeds(seed: int) -> None:
        raise AssertionError("augmentation reseeded the CUDA generators")

    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeds)
    root = make_folder(tmp_path / "d", per_class=3)
    data = ImageFolderData(str(root), 16, 4, seed=3, train_transform=AUGMENT, in_memory=True)
    data.setup()
    state, dataset = torch.get_rng_state(), data.datasets["train"]
    images = [dataset[EpochIndex(1, i)][0] for i in range(len(dataset))]
    assert images and torch.equal(torch.get_rng_state(), state)


def test_gradients_are_reduced_in_few_bucketed_calls(monkeypatch) -> None:
    """Two ranks' all-reduce is mocked as a sum of three copies: each gradient must come back
    averaged (x 1.5) from far fewer calls than it has tensors."""
    calls = []

    def all_reduce(tensor: torch.Tensor) -> None:
        calls.append(tensor.numel())
        tensor.mul_(3)

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    torch.manual_seed(0)
    backbone = TransferNet(BACKBONE, ["a", "b"], 32).backbone
    for parameter in backbone.parameters():
        parameter.grad = torch.randn_like(parameter)
    before = [p.grad.clone() for p in backbone.parameters()]
    assert reduce_gradients(backbone.parameters(), 2) == len(calls) == 1  # 9 MB: one bucket
    assert len(before) > 100
    for grad, old in zip((p.grad for p in backbone.parameters()), before, strict=True):
        torch.testing.assert_close(grad, old * 1.5)


def test_compilation_is_made_in_the_rank_that_trains() -> None:
    """A module pickled to a ddp_spawn rank loses its compiled forward; configure_model, which
    Lightning calls in every rank, compiles it there. compile=auto stays eager on this CPU kind
    (measured: bench/compile_cpu.py)."""
    model = TransferModel(BACKBONE, ["a", "b"], 32)
    model.compile_backbone = True
    model.configure_model()
    assert model.backbone._compiled_call_impl is not None
    rank = pickle.loads(pickle.dumps(model))
    assert rank.backbone._compiled_call_impl is None
    rank.configure_model()
    assert rank.backbone._compiled_call_impl is not None
    if src.run.runtime.cpu_kind() == "avx2":
        assert not compile_backbone("auto", "cpu", 10**6)
    assert compile_backbone(True, "cpu", 1) and not compile_backbone(False, "cpu", 10**6)


SET_HERE = {"logger", "head_fit"}


def test_figures_describe_the_tested_checkpoint(image_root, tmp_path, monkeypatch) -> None:
    """The model in memory after the final test is scrambled (as ddp_spawn's parent holds the
    last epoch's weights): the confusion matrix still gives the reported test/acc."""
    matrices = []
    drawn = src.report.figures.confusion_matrix_figure
    monkeypatch.setattr(
        src.report.figures,
        "confusion_matrix_figure",
        lambda matrix, classes: matrices.append(matrix) or drawn(matrix, classes),
    )

    def scramble(self: TransferModel) -> None:
        if self.trained:
            with torch.no_grad():
                self.head.weight.zero_()
                self.head.bias.copy_(torch.tensor([10.0, 0.0, 0.0]))

    monkeypatch.setattr(TransferModel, "on_test_end", scramble, raising=False)
    weights = calibrated_mobilenet_v2(image_root, tmp_path / "calibrated.pth")
    overrides = [o for o in tiny_overrides(image_root, weights) if o.split("=")[0] not in SET_HERE]
    cfg = compose_cfg([*overrides, "logger=tensorboard", "head_fit=probe"], tmp_path / "run")
    with open_dict(cfg):
        cfg.logger.save_dir = str(tmp_path / "tb")
    train(cfg)
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    (matrix,) = matrices
    assert int(matrix.sum()) == result["n_test"]
    assert float(matrix.trace() / matrix.sum()) == pytest.approx(result["test/acc"])
    assert result["test/acc"] != pytest.approx(1 / 3)  # the scrambled model's: all class 0


@pytest.mark.slow
def test_first_batch_s_counts_from_the_interpreter_start(tmp_path) -> None:
    """A process that ran other work before exec'ing python (as `bash -c "pip install ... &&
    python -m src.train"` does): the age counts from the exec on, not from the process start."""
    child = (
        "import os, time, src.run.callbacks as c; "
        "print(c.interpreter_age(), time.monotonic() - float(os.environ['EXEC_AT']))"
    )
    parent = (
        "import os, sys, time, torch; "  # work before the exec: importing torch
        "os.environ['EXEC_AT'] = str(time.monotonic()); "
        f"os.execv(sys.executable, [sys.executable, '-c', {child!r}])"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", parent], capture_output=True, text=True, check=True, env=env
    )
    age, since_exec = map(float, out.stdout.split())
    assert 0 <= age <= since_exec


BENCH = [sys.executable, "-m", "bench.gpu", "--device", "cpu", "--quick"]


@pytest.mark.slow
def test_the_gpu_bench_runs_quick_on_the_cpu(tmp_path) -> None:
    out = tmp_path / "GPU.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [*BENCH, "--out", str(out), "--backbones", "mobilenet_v2"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    table = out.read_text()
    for row in ("pre-flight", "| mobilenet_v2 |", "frozen run (probe)", "1-epoch fine-tune"):
        assert row in table
    assert "same predictions: yes" in table and "matrix = test/acc: yes" in table
