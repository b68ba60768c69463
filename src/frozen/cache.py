"""A frozen backbone's pooled features, computed once per split and cached on disk."""

import copy
import hashlib
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import PIL
import torch
import torchvision
from filelock import FileLock
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from src.data.images import decode_all, progress, stream_images
from src.data.module import ImageFolderData
from src.model.inference import chunks, outputs
from src.model.network import TransferNet
from src.run.errors import UserError

log = logging.getLogger(__name__)
FOLD_TOLERANCE = 1e-3  # largest relative change of folded features accepted (float32 rounding)


def versions() -> dict[str, str]:
    """The libraries whose changes can change decoded images or features."""
    try:
        import timm

        timm_version = timm.__version__
    except ImportError:
        timm_version = None
    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm_version,
        "pillow": PIL.__version__,
    }


def cache_key(
    backbone: dict[str, Any],
    data: ImageFolderData,
    precision: str,
    device: torch.device,
    layout: torch.memory_format = torch.channels_last,
    layers: tuple[str, ...] = (),
) -> str:
    """Hash of everything the features depend on: backbone, weights, size, precision, device
    type, memory format (its kernels round differently), library versions, the stage `layers`
    pooled (if any) and every image of the folder (path, size, mtime), so one cache serves
    every split and fold of it."""
    weights = backbone.get("weights")
    files = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in data.all_images()]
    if weights and Path(weights).is_file():
        files.append((weights, Path(weights).stat().st_size, Path(weights).stat().st_mtime_ns))
    key = {
        "format": 3,  # bump when decoding or extraction changes
        "backbone": backbone,
        "image_size": data.image_size,
        "precision": precision,
        "device": device.type,
        "memory_format": str(layout),
        "versions": versions(),
        "files": files,
    }
    if data.resize != "squash":  # squash keys stay as they were: their caches stay valid
        key["resize"] = data.resize
    if layers:
        key["stages"] = list(layers)
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def folded_pairs(backbone: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(container, conv name, norm name) for each convolution registered right before its
    BatchNorm (torchvision's Sequential blocks, timm's conv/bn attribute pairs)."""
    pairs = []
    for container in backbone.modules():
        names = list(container._modules)
        for conv_name, bn_name in zip(names, names[1:], strict=False):
            conv, bn = container._modules[conv_name], container._modules[bn_name]
            if (
                isinstance(conv, nn.Conv2d)
                and isinstance(bn, nn.BatchNorm2d)
                and bn.track_running_stats
                and bn.num_features == conv.out_channels
                and (type(bn) is nn.BatchNorm2d or hasattr(bn, "act"))
            ):
                pairs.append((container, conv_name, bn_name))
    return pairs


def fold_batchnorm(backbone: nn.Module, sample: torch.Tensor) -> nn.Module:
    """A copy of an eval-mode backbone with each BatchNorm folded into the convolution before it,
    or the backbone itself when the folded copy's features on `sample` differ.

    Same outputs with one pass over memory fewer per layer (MobileNetV2 extraction +30%). timm's
    BatchNormAct2d keeps its activation. Registration order is not always call order, so the
    copy is checked against the original in float32 before it is used.
    """
    folded = copy.deepcopy(backbone)
    pairs = folded_pairs(folded)
    for container, conv_name, bn_name in pairs:
        conv, bn = container._modules[conv_name], container._modules[bn_name]
        container._modules[conv_name] = fuse_conv_bn_eval(conv, bn)
        rest = [] if type(bn) is nn.BatchNorm2d else [bn.drop, bn.act]
        container._modules[bn_name] = nn.Sequential(*rest) if rest else nn.Identity()
    if not pairs:
        return backbone
    with torch.inference_mode():
        expected, got = backbone(sample), folded(sample)
    error = float((got - expected).norm() / expected.norm().clamp_min(1e-30))
    if error > FOLD_TOLERANCE:
        log.info("BatchNorm folding changes the features by %.2g: extracting unfolded", error)
        return backbone
    return folded


@contextmanager
def pooled_stages(
    backbone: nn.Module, layers: tuple[str, ...]
) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """`backbone`'s forward, or with `layers` one that returns their outputs mean-pooled and
    concatenated: the image at several depths (the audit's label-issue probes read them, as
    Head2Toe's linear probes do, Evci et al. 2022). The hooks go when the context ends."""
    if not layers:
        yield backbone
        return
    maps: dict[str, torch.Tensor] = {}
    modules = dict(backbone.named_modules())
    handles = [
        modules[name].register_forward_hook(
            lambda _layer, _inputs, out, name=name: maps.__setitem__(name, out)
        )
        for name in layers
    ]

    def forward(x: torch.Tensor) -> torch.Tensor:
        backbone(x)
        return torch.cat([maps[name].float().mean((2, 3)) for name in layers], 1)

    try:
        yield forward
    finally:
        for handle in handles:
            handle.remove()


def extract(
    model: TransferNet,
    batches: Iterable[torch.Tensor],
    device: torch.device,
    bf16: bool,
    total: int | None = None,
    layers: tuple[str, ...] = (),
) -> torch.Tensor:
    """Pooled features of uint8 image batches (or of the backbone's stage `layers`, see
    `pooled_stages`), in float32, computed in eval mode.

    Written into one tensor as the batches come (from a streaming loader, decoding overlaps the
    compute), so memory holds the features and a few batches, never all the images. On a GPU
    that tensor is on the device and copied to the host once, at the end, so the host never
    waits for a batch.
    """
    model.eval()
    batches = iter(batches)
    first = next(batches)
    backbone = fold_batchnorm(model.backbone, model.normalise(first[:2])).to(device)
    model.to(device)
    with pooled_stages(backbone, layers) as forward:
        rows = outputs(
            lambda x: forward(model.normalise(x)),
            itertools.chain([first], batches),
            device,
            bf16,
            host=device.type == "cpu",
        )
        if total is None:
            features = torch.cat(list(rows))
        else:
            features, done = None, 0
            for out in rows:
                if features is None:
                    features = torch.empty(total, out.shape[1], device=out.device)
                features[done : done + len(out)] = out
                done += len(out)
    model.cpu()
    return features.cpu()


def extraction_batch(batch_size: int, device: torch.device) -> int:
    """Images per extraction batch: 64 on a CPU (as measured there); on a GPU four training
    batches and at least 256, since inference keeps no activations for a backward pass (a batch
    that trains fits several times over) and larger batches fill the device."""
    return 64 if device.type == "cpu" else max(256, 4 * batch_size)


def extract_folder(
    model: TransferNet,
    data: ImageFolderData,
    device: torch.device,
    bf16: bool,
    batch_size: int,
    layers: tuple[str, ...] = (),
) -> torch.Tensor:
    """Features of every image of the folder: decoded in threads when they fit in memory (as the
    data module keeps them), else streamed through DataLoader workers."""
    paths = data.all_images()
    if not data.streaming:
        images = decode_all(paths, data.image_size, data.resize)
        return extract(model, chunks(images, batch_size), device, bf16, len(paths), layers)

    def images() -> Iterator[torch.Tensor]:
        for _, batch, errors in progress(
            stream_images(
                paths,
                data.image_size,
                batch_size,
                data.workers or None,
                device.type == "cuda",
                data.resize,
            ),
            -(-len(paths) // batch_size),
            "extracting features",
        ):
            if errors:
                index, why = next(iter(errors.items()))
                raise UserError(f"cannot decode {paths[index]}: {why}. Fix: replace or delete it")
            yield batch

    return extract(model, images(), device, bf16, len(paths), layers)


def cached_features(
    model: TransferNet,
    data: ImageFolderData,
    backbone: dict[str, Any],
    cache_dir: str | Path | None,
    device: torch.device,
    bf16: bool,
    batch_size: int = 32,
    layers: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """Features of every split (the pooled stage `layers` where given): from `cache_dir` when
    valid, else extracted (and saved there).

    The cache holds one row per image of the folder, for every split and fold. A file lock
    beside it makes concurrent jobs with the same key (a sweep's parallel jobs) extract once:
    the first extracts, the others wait and read its file. `batch_size`: the run's, from which
    `extraction_batch` sizes the extraction's.
    """
    precision = "bf16" if bf16 else "fp32"
    batch_size = extraction_batch(batch_size, device)
    if cache_dir is None:
        features = extract_folder(model, data, device, bf16, batch_size, layers)
    else:
        layout = model.input_format(device.type)
        key = cache_key(backbone, data, precision, device, layout, layers)
        path = Path(cache_dir) / f"{key}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(path.with_suffix(".lock")):
            if path.is_file():
                log.info("features from cache %s", path)
                features = read_features(path)
            else:
                features = extract_folder(model, data, device, bf16, batch_size, layers)
                partial = path.with_suffix(f".{os.getpid()}.tmp")
                torch.save(features, partial)
                os.replace(partial, path)  # atomic: a reader without the lock sees all or none
                log.info("features cached in %s", path)
    return {name: features[indices] for name, indices in data.split_indices().items()}


def read_features(path: Path) -> torch.Tensor:
    """A cache file's features (weights-only: a foreign file runs no code), or a UserError."""
    try:
        features = torch.load(path, weights_only=True)
    except Exception as err:  # torch raises many types for a broken or foreign file
        raise UserError(
            f"cannot read the feature cache {path} ({type(err).__name__}). Fix: delete it (it is "
            "rebuilt), or cache_dir=null"
        ) from err
    if not isinstance(features, torch.Tensor):
        raise UserError(f"{path} is not a feature cache. Fix: delete it (it is rebuilt)")
    return features
