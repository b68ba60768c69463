"""Every torchvision classification model as a backbone, by name, with its weights enum."""

import warnings
from pathlib import Path

import torch
from torch import nn

from src.backbones.describe import (
    OFFLINE_FIXES,
    Backbone,
    describe,
    is_file_weights,
    load_weights_file,
    unknown,
)
from src.run.errors import UserError

CLASS_LAYERS = (nn.Linear, nn.Dropout, nn.Conv2d)  # where a classifier's class-specific part starts


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
