"""A `Backbone`: everything model-specific, found from the model itself by one forward pass: the
feature extractor (the body plus the model's own pre-logits pooling and norm), its feature size,
input mean/std and default or required size, and the Grad-CAM target layer (with the reshape
that tokens need). Nothing else in src/ keys a table by backbone name."""

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from src.run.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STAGE_LEVELS = 3  # measured on dirty copies of the embedded data (docs/audit.md)
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
WEIGHT_FILES = {".pt", ".pth", ".bin", ".safetensors"}
OFFLINE_FIXES = (
    "backbone.weights=null (random init), backbone.weights=/path/to/state_dict.pth (a local "
    "file), or backbone=efficientnet_lite0 (its weights ship with a package)"
)


def tokens_to_maps(tokens: torch.Tensor) -> torch.Tensor:
    """Transformer tokens (N, T, C) as maps (N, C, s, s): prefix tokens (class, registers) dropped.

    The patch grid is the largest square in T; what precedes it are the prefix tokens.
    """
    side = math.isqrt(tokens.shape[1])
    grid = tokens[:, tokens.shape[1] - side * side :]
    return grid.reshape(len(tokens), side, side, -1).permute(0, 3, 1, 2)


def channels_last_to_first(maps: torch.Tensor) -> torch.Tensor:
    """NHWC feature maps (Swin in timm) as NCHW."""
    return maps.permute(0, 3, 1, 2)


RESHAPES = {"NCHW": None, "NHWC": channels_last_to_first, "tokens": tokens_to_maps}


@dataclass
class Backbone:
    """A feature extractor and what it needs.

    `module` maps normalised images (N, 3, H, W) to pooled pre-logits features (N, num_features).
    `cam_layer` is a module name inside `module` whose output Grad-CAM reads, after
    `cam_reshape` where that output is not an NCHW map. `stage_layers` name the blocks that end
    the last `STAGE_LEVELS` resolutions (timm's `feature_info` stages), whose pooled outputs
    the audit's label-issue probes read (src.frozen.cache); empty where there are none (ViT).
    """

    module: nn.Module
    num_features: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_size: int
    cam_layer: str
    cam_reshape: Callable[[torch.Tensor], torch.Tensor] | None = None
    stage_layers: tuple[str, ...] = ()


@dataclass
class _Output:
    """What one module returned in the probe: when it finished, how often it ran, its shape."""

    name: str
    order: int
    calls: int
    shape: tuple[int, ...]
    pooled: bool


def is_attention(layer: nn.Module) -> bool:
    """torchvision's and timm's self-attention modules."""
    return isinstance(layer, nn.MultiheadAttention) or type(layer).__name__.endswith("Attention")


def map_format(shape: tuple[int, ...], num_features: int) -> str:
    """NHWC (Swin in timm) when the last axis, not the second, has the feature size; else NCHW."""
    return "NHWC" if shape[-1] == num_features and shape[1] != num_features else "NCHW"


@dataclass
class _Trace:
    """What one forward pass showed: each layer's last output, when each attention block
    started and each LayerNorm ran (by call order), and the feature size."""

    outputs: dict[str, _Output]
    attention_starts: list[int]
    norms: list[tuple[int, str]]
    num_features: int


def trace(module: nn.Module, image_size: int, name: str) -> _Trace:
    """Run `module` once on a zero image at `image_size`, recording every layer's output; a
    model that refuses the size stops here with one line."""
    outputs: dict[str, _Output] = {}
    pooled: list[torch.Tensor] = []  # kept alive, so that no other output reuses their ids
    attention_starts: list[int] = []
    norms: list[tuple[int, str]] = []
    clock = iter(range(1 << 62))

    def before(layer: nn.Module, *_: object) -> None:
        if is_attention(layer):
            attention_starts.append(next(clock))

    def after(layer_name: str) -> Callable[..., None]:
        def hook(layer: nn.Module, _: tuple, out: object) -> None:
            if not isinstance(out, torch.Tensor) or isinstance(layer, nn.Identity):
                return
            if isinstance(layer, POOLS):
                pooled.append(out)
            order, seen = next(clock), outputs.get(layer_name)
            calls = seen.calls + 1 if seen else 1
            was_pooled = any(out is p for p in pooled)
            outputs[layer_name] = _Output(layer_name, order, calls, tuple(out.shape), was_pooled)
            if isinstance(layer, nn.LayerNorm):
                norms.append((order, layer_name))

        return hook

    handles = []
    for layer_name, layer in module.named_modules():
        if layer_name:
            handles.append(layer.register_forward_pre_hook(before))
            handles.append(layer.register_forward_hook(after(layer_name)))
    try:
        with torch.no_grad():
            out = module.eval()(torch.zeros(1, 3, image_size, image_size))
    except (RuntimeError, AssertionError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(
            f"backbone {name} cannot take image_size={image_size} ({first[:160]}). "
            f"Fix: another image_size, e.g. its default (python -m src.backbones {name})"
        ) from err
    finally:
        for handle in handles:
            handle.remove()
    return _Trace(outputs, attention_starts, norms, out.shape[1])


def stage_ends(module: nn.Module, seen: _Trace, levels: int = STAGE_LEVELS) -> tuple[str, ...]:
    """The blocks that end each of the last `levels` resolutions of a CNN's (NCHW) maps: at each
    map size, the last to finish of the shallowest blocks of a Sequential (EfficientNet's
    `blocks.N`, ResNet's `layerN.M`, MobileNetV2's and VGG's `features.N`)."""
    blocks = {
        f"{parent}.{child}" if parent else child
        for parent, container in module.named_modules()
        if isinstance(container, (nn.Sequential, nn.ModuleList))
        for child in container._modules
    }
    ends: dict[tuple[int, ...], tuple[int, int, str]] = {}
    for o in seen.outputs.values():
        if (
            o.name in blocks
            and o.calls == 1
            and len(o.shape) == 4
            and not o.pooled
            and min(o.shape[2:]) > 1
        ):
            rank = (-o.name.count("."), o.order, o.name)  # shallowest, then last to finish
            ends[o.shape[2:]] = max(ends.get(o.shape[2:], rank), rank)
    by_order = sorted(ends.values(), key=lambda rank: rank[1])
    return tuple(name for _, _, name in by_order[-levels:])


def probe(module: nn.Module, image_size: int, name: str) -> tuple[int, str, str, tuple[str, ...]]:
    """(feature size, Grad-CAM layer, its output format, stage ends) from one forward pass at
    `image_size`.

    The Grad-CAM layer is the last module, run once, whose output is a spatial map (at least
    2x2, not a pooling layer's, not inside attention), unless a transformer's attention runs
    later: then the norm that feeds the last attention, whose patch tokens still pass gradient
    to the class token.
    """
    seen = trace(module, image_size, name)
    num_features = seen.num_features
    attentions = [n + "." for n, m in module.named_modules() if n and is_attention(m)]

    def spatial(o: _Output) -> bool:
        if o.calls != 1 or len(o.shape) != 4 or o.pooled:
            return False
        if any(o.name.startswith(a) for a in attentions):  # attention's own 4-D tensors
            return False
        side = o.shape[1:3] if map_format(o.shape, num_features) == "NHWC" else o.shape[2:]
        return min(side) > 1

    maps = [(o.order, n, o.shape) for n, o in seen.outputs.items() if spatial(o)]
    last_map = max(maps, default=(-1, "", ()))
    if seen.attention_starts and last_map[0] < seen.attention_starts[-1]:
        feeding = [n for n in seen.norms if n[0] < seen.attention_starts[-1]]
        if feeding:
            return num_features, max(feeding)[1], "tokens", ()
    if not last_map[1]:
        raise UserError(
            f"backbone {name} has no spatial feature map at image_size={image_size}. "
            "Fix: a larger image_size"
        )
    fmt = map_format(last_map[2], num_features)
    return num_features, last_map[1], fmt, stage_ends(module, seen) if fmt == "NCHW" else ()


def load_weights_file(model: nn.Module, path: Path) -> None:
    """Load a state dict saved with torch.save (or safetensors) into the whole model."""
    if not path.is_file():
        raise UserError(f"weights file {path} not found. Fix: {OFFLINE_FIXES}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as err:  # torch.load, safetensors and load_state_dict raise many types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(
            f"cannot load weights file {path}: {first[:200]}. Fix: give a state dict saved from "
            "the same architecture (nothing in a refused file is run), or backbone.weights=null"
        ) from err


def is_file_weights(weights: str | None) -> bool:
    """Whether `weights` names a file rather than a weights tag."""
    return weights is not None and (Path(weights).suffix in WEIGHT_FILES or Path(weights).exists())


def describe(
    module: nn.Module,
    name: str,
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    default_size: int,
    cam_layer: str | None = None,
) -> Backbone:
    """Probe `module` at `image_size` and collect its description."""
    num_features, layer, fmt, stages = probe(module, image_size, name)
    return Backbone(
        module,
        num_features,
        tuple(float(v) for v in mean),
        tuple(float(v) for v in std),
        default_size,
        cam_layer or layer,
        None if cam_layer else RESHAPES[fmt],
        stages,
    )


def unknown(kind: str, name: str, names: list[str]) -> UserError:
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return UserError(
        f"unknown {kind} model {name!r}{hint}. Fix: backbone.name=<a name listed by "
        f"python -m src.backbones '{name[:4]}*'>"
    )
