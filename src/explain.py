"""Grad-CAM heatmaps of where a model looks: `python -m src.explain ckpt_path=... inputs=...`."""

from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from src.data import decode_all
from src.errors import UserError, exit_on_user_error
from src.figures import gradcam_figure
from src.model import TransferModel
from src.predict import image_paths, load_checkpoint, logits, pick_device

# A late convolutional feature map of each backbone (a module name in TransferModel):
# MobileNetV2's final 1x1 conv block, VGG19's last ReLU before the final max pool (conv5_4, as in
# the Grad-CAM paper), EfficientNet-Lite0's last stride-32 stage: its final MBConv block and 1x1
# head conv (`backbone.bn2`) give maps smeared around the object (on planted squares they peak
# inside the square for 4 of 12 images, this stage for 12 of 12).
TARGET_LAYERS = {
    "mobilenet_v2": "backbone.18",
    "vgg19": "backbone.35",
    "efficientnet_lite0": "backbone.blocks.5",
}


def target_layer(model: TransferModel, name: str | None = None) -> nn.Module:
    """The module Grad-CAM reads: `name` (a dotted module name) or the backbone's default."""
    backbone = model.hparams.backbone["name"]
    if name is None:
        if backbone not in TARGET_LAYERS:
            raise UserError(
                f"no default Grad-CAM layer for backbone {backbone}. "
                "Fix: target_layer=<module name>, e.g. backbone.features.10"
            )
        name = TARGET_LAYERS[backbone]
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        raise UserError(
            f"no module {name!r} in the {backbone} model. Fix: target_layer=<a module name such "
            f"as {convs[-1]}> or null for the default {TARGET_LAYERS.get(backbone)}"
        ) from err


def gradcam(
    model: TransferModel,
    images: torch.Tensor,
    targets: list[int],
    layer: nn.Module,
    device: torch.device | None = None,
    batch_size: int = 16,
) -> np.ndarray:
    """Grad-CAM heatmaps (N, H, W) in [0, 1] of uint8 images for each image's target class.

    The input requires gradients, so a frozen backbone (no parameter gradients) still has
    gradients at `layer`.
    """
    device = device or torch.device("cpu")
    model.eval().to(device)
    heatmaps = []
    with torch.enable_grad(), GradCAM(model, [layer]) as cam:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(device).float().requires_grad_()
            classes = targets[start : start + batch_size]
            heatmaps.append(cam(batch, targets=[ClassifierOutputTarget(c) for c in classes]))
    return np.concatenate(heatmaps)


def explain(cfg: DictConfig) -> list[Path]:
    """Write one PNG per input: the image beside its Grad-CAM overlay; return their paths."""
    paths = image_paths(cfg.inputs)
    model = load_checkpoint(cfg.ckpt_path)
    classes = list(model.hparams.classes)
    if cfg.target is not None and cfg.target not in classes:
        raise UserError(f"unknown target class {cfg.target!r}. Fix: target=one of {classes}")
    images = decode_all(paths, model.hparams.image_size)
    device = pick_device(cfg.device)
    probs = logits(model, images, device).softmax(1)
    predicted = probs.argmax(1).tolist()
    targets = predicted if cfg.target is None else [classes.index(cfg.target)] * len(paths)
    heatmaps = gradcam(model, images, targets, target_layer(model, cfg.target_layer), device)
    out = Path(cfg.output_dir)
    stems = [p.stem for p in paths]
    written = []
    for i, path in enumerate(paths):
        name = path.stem if stems.count(path.stem) == 1 else path.name.replace(".", "_")
        left = f"{path.name}\npredicted: {classes[predicted[i]]} ({probs[i, predicted[i]]:.2f})"
        right = f"Grad-CAM for {classes[targets[i]]}\n(p = {probs[i, targets[i]]:.2f})"
        figure = gradcam_figure(images[i : i + 1], heatmaps[i : i + 1], [left], [right])
        written.append(out / f"{name}_gradcam.png")
        figure.savefig(written[-1], dpi=100)
        print(
            f"{path}: {classes[predicted[i]]} -> Grad-CAM of {classes[targets[i]]} in {written[-1]}"
        )
    return written


@exit_on_user_error
@hydra.main(config_path="../conf", config_name="explain", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Command-line entry: Hydra composes `cfg` from conf/explain.yaml and the overrides."""
    explain(cfg)


if __name__ == "__main__":
    main()
