"""The network a run trains and the commands use: a backbone (with its own pooling), its input
preprocessing and a new linear head. Plain torch, so predict, explain and export load a checkpoint
without importing Lightning."""

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

from src.backbones.describe import Backbone
from src.run.checkpoints import RECORD, read_checkpoint, upgrade
from src.run.runtime import memory_format, normalisation, train_strided_depthwise_in_fp32


class TransferNet(nn.Module):
    """Backbone (body + the model's own pre-logits pooling) -> Linear(num_features, classes).

    Takes uint8 RGB images (N, 3, H, W), made `image_size` square by `resize` (squash, pad or
    crop: src.data.images.fit_square), and normalises them itself, so a checkpoint carries its
    preprocessing. A batch of 2-D inputs is taken as
    precomputed pooled features (the cached path of a frozen backbone) by `logits`.
    """

    def __init__(
        self,
        backbone: dict[str, Any],
        classes: list[str],
        image_size: int = 160,
        resize: str = "squash",
    ) -> None:
        super().__init__()
        self.classes = list(classes)
        self.image_size, self.resize = image_size, resize
        self.backbone_config = backbone
        net: Backbone = instantiate(backbone, image_size=image_size)
        self.backbone = net.module
        self.spec = net  # what Grad-CAM and extraction need to know about this backbone
        train_strided_depthwise_in_fp32(self.backbone)
        self.head = nn.Linear(net.num_features, len(classes))
        self.register_buffer("mean", torch.tensor(net.mean).view(1, 3, 1, 1) * 255, False)
        self.register_buffer("std", torch.tensor(net.std).view(1, 3, 1, 1) * 255, False)
        self.norm = normalisation(self.backbone)
        self.memory_format: torch.memory_format | None = None  # None: per CPU kind (normalise)
        self.record: dict[str, Any] = {}  # the run's settings and split, saved in checkpoints

    def input_format(self, device_type: str, learning: bool = False) -> torch.memory_format:
        """`memory_format`, or else the one measured faster for this backbone on this kind of
        device, learning (forward and backward) or not (src.run.runtime.memory_format)."""
        return self.memory_format or memory_format(self.norm, learning, device_type)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's input for uint8 (or 0-255 float) images, in `input_format` and the
        weights' dtype (normalised in float32 first: bf16-true and 16-true hold bf16 or fp16
        weights, which float32 inputs would not match)."""
        x = (images.float() - self.mean.float()) / self.std.float()
        first = next(self.backbone.parameters(), None)
        learning = torch.is_grad_enabled() and first is not None and first.requires_grad
        dtype = self.head.weight.dtype
        return x.to(dtype).contiguous(memory_format=self.input_format(x.device.type, learning))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features of uint8 (or 0-255 float) images."""
        return self.backbone(self.normalise(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.head(self.features(images))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of images, or of pooled features (2-D, cast to the weights' dtype:
        cached features are float32)."""
        return self.head(x.to(self.head.weight.dtype)) if x.ndim == 2 else self(x)


def load_model(ckpt_path: str | Path) -> TransferNet:
    """A trained network from a checkpoint, built offline (the checkpoint holds all weights)."""
    ckpt = upgrade(read_checkpoint(ckpt_path))
    hparams = ckpt["hyper_parameters"]
    backbone = {**hparams["backbone"], "weights": None}
    resize = hparams.get("resize", "squash")  # checkpoints from before data.resize squashed
    model = TransferNet(backbone, hparams["classes"], hparams["image_size"], resize)
    model.load_state_dict(ckpt["state_dict"])
    model.record = ckpt.get(RECORD, {})
    model.task = hparams.get("task", "multiclass")
    return model.eval()
