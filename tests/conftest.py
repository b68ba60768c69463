"""Shared fixtures: small generated image folders and configs composed the way Hydra does."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from PIL import Image

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
COLOURS = [(220, 40, 40), (40, 200, 60), (50, 60, 230)]  # one per class, easy to learn


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
    return cfg


def tiny_overrides(root: Path) -> list[str]:
    """A fast CPU run: random-init MobileNetV2, 32 px, folder `root`, 2 epochs, no logger."""
    return [
        "backbone.weights=null",
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
    """`tiny_overrides` on the tiny folder, writing under tmp_path/run."""
    return compose_cfg(tiny_overrides(image_root), tmp_path / "run")
