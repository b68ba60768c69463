"""A frozen backbone's pooled features, computed once per split and cached on disk."""

import copy
import hashlib
import json
import logging
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from src.data import ImageFolderData, decode_all
from src.model import TransferModel

log = logging.getLogger(__name__)


def cache_key(backbone: dict[str, Any], data: ImageFolderData, precision: str) -> str:
    """Hash of everything the features depend on: backbone, weights, size, precision, files."""
    weights = backbone.get("weights")
    files = {
        name: [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in split.paths]
        for name, split in data.splits().items()
    }
    if weights and Path(weights).is_file():
        files["weights"] = [
            (weights, Path(weights).stat().st_size, Path(weights).stat().st_mtime_ns)
        ]
    key = {
        "format": 1,  # bump when decoding or extraction changes
        "backbone": backbone,
        "image_size": data.image_size,
        "precision": precision,
        "torch": torch.__version__,
        "files": files,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def fold_batchnorm(backbone: nn.Module) -> nn.Module:
    """A copy of an eval-mode backbone with each BatchNorm folded into the convolution before it.

    Same outputs with one pass over memory fewer per layer (MobileNetV2 extraction +30%). Folds
    the Conv2d -> BatchNorm2d pairs of nn.Sequential containers, as torchvision builds them.
    """
    folded = copy.deepcopy(backbone)
    for container in folded.modules():
        if not isinstance(container, nn.Sequential):
            continue
        names = list(container._modules)
        for conv_name, bn_name in zip(names, names[1:], strict=False):
            conv, bn = container._modules[conv_name], container._modules[bn_name]
            if isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d:
                container._modules[conv_name] = fuse_conv_bn_eval(conv, bn)
                container._modules[bn_name] = nn.Identity()
    return folded


@torch.inference_mode()
def extract(
    model: TransferModel,
    images: torch.Tensor,
    device: torch.device,
    bf16: bool,
    batch_size: int = 64,
) -> torch.Tensor:
    """Pooled features of uint8 images, in float32, computed in eval mode."""
    model.eval().to(device)
    backbone = fold_batchnorm(model.backbone)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    chunks = []
    with autocast:
        for start in range(0, len(images), batch_size):
            x = model.normalise(images[start : start + batch_size].to(device))
            chunks.append(model.pool(backbone(x)).float().cpu())
    model.cpu()
    return torch.cat(chunks)


def cached_features(
    model: TransferModel,
    data: ImageFolderData,
    backbone: dict[str, Any],
    cache_dir: str | Path | None,
    device: torch.device,
    bf16: bool,
) -> dict[str, torch.Tensor]:
    """Features of every split: from `cache_dir` when valid, else extracted (and saved there)."""
    precision = "bf16" if bf16 else "fp32"
    path = Path(cache_dir) / f"{cache_key(backbone, data, precision)}.pt" if cache_dir else None
    if path is not None and path.is_file():
        log.info("features from cache %s", path)
        return torch.load(path, weights_only=True)
    features = {}
    for name, split in data.splits().items():
        if name == "test" and data.test_is_val:
            features[name] = features["val"]
            continue
        features[name] = extract(model, decode_all(split.paths, data.image_size), device, bf16)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(features, partial)
        os.replace(partial, path)  # atomic: a concurrent job sees the whole file or none
        log.info("features cached in %s", path)
    return features
