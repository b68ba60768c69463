"""Shared fixtures: small generated image folders and configs composed the way Hydra does; no
network in the session; a record of what each `Trainer.fit` ran."""

import os
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from PIL import Image

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
COLOURS = [(220, 40, 40), (40, 200, 60), (50, 60, 230)]  # one per class, easy to learn
OFFLINE = Path(__file__).resolve().parent / "offline"  # its sitecustomize guards subprocesses


@pytest.fixture(scope="session", autouse=True)
def no_network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Any connection (or host lookup) other than loopback fails loudly, in this process and in
    every Python subprocess (OFFLINE first on PYTHONPATH); the session fails at its end if one
    was attempted, even where the code caught the error."""
    from tests.offline.network_guard import LOG, install

    log = tmp_path_factory.getbasetemp() / "network_attempts.log"
    paths = [str(OFFLINE), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    saved = {name: os.environ.get(name) for name in ("PYTHONPATH", LOG)}
    os.environ.update({"PYTHONPATH": os.pathsep.join(paths), LOG: str(log)})
    install()
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if log.exists() and log.read_text():
        pytest.fail(f"tests tried to reach the network:\n{log.read_text()}", pytrace=False)


def make_folder(root: Path, per_class: int = 8, size: int = 24, validation: int = 0) -> Path:
    """A tiny dataset in the published layout: 3 classes of noisy solid-colour PNGs."""
    generator = torch.Generator().manual_seed(0)
    for split, count in (("training", per_class), ("validation", validation)):
        for c, colour in enumerate(COLOURS):
            if count == 0:
                continue
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                noise = torch.randint(-30, 30, (size, size, 3), generator=generator)
                pixels = (torch.tensor(colour) + noise).clamp(0, 255).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"image{i}.png")
    return root


@pytest.fixture
def one_thread():
    """One torch thread for tests of tiny tensors: a second only waits on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """3 classes x 8 training images (24 px) and 3 x 4 validation images."""
    return make_folder(tmp_path / "data", per_class=8, validation=4)


def compose_cfg(overrides: list[str], output_dir: Path) -> DictConfig:
    """The root config with `overrides`, writing under `output_dir`, as `python -m src.train`."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir = str(output_dir)
        cfg.cache_dir = str(output_dir / "cache")
        cfg.data.scan_cache = str(output_dir / "scan")
    return cfg


def command_cfg(name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """conf/<name>.yaml with `overrides`, writing under `output_dir`, as `python -m src.<name>`."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides)
    output_dir.mkdir(parents=True)
    with open_dict(cfg):
        cfg.output_dir = str(output_dir)
    return cfg


def tiny_overrides(root: Path, weights: Path | str = "null") -> list[str]:
    """A fast CPU run: MobileNetV2 (`weights`: random init, or a file such as
    `calibrated_mobilenet_v2`'s), 32 px, folder `root`, 2 epochs, no logger; a frozen head
    trains by the recipe (its epochs), which most tests are about."""
    return [
        "head_fit=recipe",
        f"backbone.weights={weights}",
        "data=imagefolder",
        f"data.root={root}",
        "image_size=32",
        "batch_size=4",
        "trainer=cpu",
        "trainer.max_epochs=2",
        "logger=none",
        "precision=32-true",
    ]


@pytest.fixture
def tiny_cfg(image_root: Path, tmp_path: Path) -> DictConfig:
    """`tiny_overrides` on the tiny folder with a calibrated MobileNetV2 (features that carry
    signal), writing under tmp_path/run."""
    weights = calibrated_mobilenet_v2(image_root, tmp_path / "calibrated.pth")
    return compose_cfg(tiny_overrides(image_root, weights), tmp_path / "run")


def calibrate_batchnorm(module: torch.nn.Module, images: torch.Tensor) -> torch.nn.Module:
    """Set every BatchNorm's running statistics to those of `images` (normalised inputs).

    A randomly initialised backbone in eval mode normalises with mean 0 / variance 1, so its
    activations shrink layer by layer (MobileNetV2's features end near 1e-8): tests of the
    backbone path would then pass with a wrong backbone. Calibrated, its features carry signal.
    """
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the calibration batch
    module.train()
    with torch.no_grad():
        module(images)
    for bn in norms:
        bn.momentum = 0.1
    return module.eval()


def calibrated_mobilenet_v2(root: Path, path: Path, size: int = 32) -> Path:
    """A random MobileNetV2 state dict calibrated on the training images of `root`, saved."""
    import torchvision

    from src.data.images import decode
    from src.data.scan import list_images

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None)
    paths = [p for c in sorted((root / "training").iterdir()) for p in list_images(c)]
    images = torch.stack([decode(p, size) for p in paths]).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    calibrate_batchnorm(model.features, (images - mean) / std)
    torch.save(model.state_dict(), path)
    return path


class FitRecord(L.Callback):
    """What one `Trainer.fit` ran: the global step it started from, the epochs it began, the
    training batches it ran and the global step it ended at (None if it did not end)."""

    def __init__(self) -> None:
        self.start_step: int | None = None
        self.epochs: list[int] = []
        self.batches = 0
        self.end_step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = trainer.global_step

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs.append(trainer.current_epoch)

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        self.batches += 1

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.end_step = trainer.global_step


@pytest.fixture
def fits(monkeypatch: pytest.MonkeyPatch) -> list[FitRecord]:
    """A FitRecord of every `Trainer.fit` in the test, in order: however a command builds its
    Trainer, each fit gets one (what tells a resumed run from one restarted with the seed)."""
    records: list[FitRecord] = []
    real = L.Trainer.fit

    def fit(trainer: L.Trainer, *args: object, **kwargs: object) -> None:
        records.append(FitRecord())
        trainer.callbacks.append(records[-1])
        return real(trainer, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", fit)
    return records


def assert_resumed(resumed: FitRecord, saved: Path | dict, straight: FitRecord) -> None:
    """`resumed` went on from checkpoint `saved` (a path or the loaded dict): it started at the
    saved global step, ran only the epochs after the saved one (a checkpoint written at an
    epoch's end) and ended on the same global step as `straight`, the uninterrupted run; a run
    restarted from scratch fails each."""
    if not isinstance(saved, dict):
        saved = torch.load(saved, map_location="cpu", weights_only=True)
    assert saved["global_step"] > 0
    assert resumed.start_step == saved["global_step"], "did not start from the saved step"
    assert resumed.epochs == list(range(saved["epoch"] + 1, straight.epochs[-1] + 1))
    assert resumed.end_step == straight.end_step is not None
