"""The LightningModule: a pretrained backbone, global average pooling and a new linear head."""

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from src.backbones import Backbone

TEST_PREFIXES = {"test": "test/", "before": "before/test_"}  # phase -> metric name prefix


def freeze(module: nn.Module) -> None:
    """Stop `module` learning: no gradients, BatchNorm and Dropout in eval mode."""
    module.requires_grad_(False)
    module.eval()


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of `module` that receive gradients."""
    return [p for p in module.parameters() if p.requires_grad]


def parameter_summary(module: nn.Module) -> str:
    """Keras-style parameter counts, three lines with thousands separators."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in trainable_parameters(module))
    return (
        f"Total params: {total:,}\nTrainable params: {trainable:,}\n"
        f"Non-trainable params: {total - trainable:,}"
    )


class TransferModel(L.LightningModule):
    """Backbone -> global average pooling -> Linear(num_features, classes).

    Takes uint8 RGB images (N, 3, H, W), resized to `image_size` square, and normalises them
    itself, so a checkpoint carries its preprocessing (hparams: classes, image_size, backbone).
    A batch of 2-D inputs is taken as precomputed pooled features (the cached path of a frozen
    backbone) and goes to the head alone.
    """

    def __init__(
        self,
        backbone: dict[str, Any],
        classes: list[str],
        image_size: int = 160,
        freeze: bool = True,
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"], logger=False)
        net: Backbone = instantiate(backbone)
        self.backbone = net.features
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(net.num_features, len(classes))
        self.register_buffer("mean", torch.tensor(net.mean).view(1, 3, 1, 1) * 255, False)
        self.register_buffer("std", torch.tensor(net.std).view(1, 3, 1, 1) * 255, False)
        self.optimizer = optimizer
        self.backbone_frozen = False
        if freeze:
            self.freeze_backbone()
        self.metrics = nn.ModuleDict(
            {
                f"{s}_acc": MulticlassAccuracy(len(classes), average="micro")
                for s in ("train", "val", "test")
            }
        )
        self.test_phase = "test"

    def freeze_backbone(self) -> None:
        """Freeze the backbone for the rest of the run (see `train`)."""
        freeze(self.backbone)
        self.backbone_frozen = True

    def train(self, mode: bool = True) -> "TransferModel":
        """Set training mode, keeping a frozen backbone (BatchNorm, Dropout) in eval mode."""
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    def on_train_epoch_start(self) -> None:
        """Enter training mode each epoch.

        Lightning 2.x restores the module modes it saw before an evaluation instead of calling
        `.train()`, so the test run before `fit` would otherwise leave the model in eval mode.
        """
        self.train()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features of uint8 (or 0-255 float) images."""
        x = (images.float() - self.mean) / self.std
        return self.pool(self.backbone(x.contiguous(memory_format=torch.channels_last)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.head(self.features(images))

    def _step(
        self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, prefix: str
    ) -> torch.Tensor:
        x, y = batch
        logits = self.head(x) if x.ndim == 2 else self(x)
        loss = F.cross_entropy(logits.float(), y)
        self.metrics[f"{stage}_acc"](logits, y)
        self.log(f"{prefix}loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
        self.log(
            f"{prefix}acc",
            self.metrics[f"{stage}_acc"],
            on_step=False,
            on_epoch=True,
            batch_size=len(y),
        )
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self._step(batch, "train", "train/")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._step(batch, "val", "val/")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._step(batch, "test", TEST_PREFIXES[self.test_phase])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer is None:
            raise RuntimeError("TransferModel needs an optimizer factory to train")
        return self.optimizer(trainable_parameters(self))


def load_model(ckpt_path: str | Path) -> TransferModel:
    """A trained model from a checkpoint, built offline (the checkpoint holds all weights)."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    hparams = dict(ckpt["hyper_parameters"])
    hparams["backbone"] = {**hparams["backbone"], "weights": None}
    model = TransferModel(**hparams)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
