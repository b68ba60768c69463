"""What the commands share: a checkpoint's model, the device, one loop over batches, Grad-CAM."""

import pickle
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from src.model.metrics import DEFAULT_THRESHOLD
from src.model.network import TransferNet, load_model
from src.run.checkpoints import CKPT_PATH_FIX
from src.run.errors import UserError


def label_thresholds(model: TransferNet) -> list[float]:
    """A multi-label model's per-label thresholds, chosen on val and stored in its checkpoint
    (`DEFAULT_THRESHOLD` for each label of a model that stores none)."""
    return model.record.get("thresholds", [DEFAULT_THRESHOLD] * len(model.classes))


def load_checkpoint(ckpt_path: str | None) -> TransferNet:
    """The trained model in `ckpt_path`, or a UserError naming what is wrong with the path."""
    if not ckpt_path:
        raise UserError(f"no checkpoint given. {CKPT_PATH_FIX}")
    path = Path(ckpt_path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found. {CKPT_PATH_FIX}")
    try:
        return load_model(path)
    except (pickle.UnpicklingError, RuntimeError, OSError, KeyError, TypeError) as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise UserError(
            f"cannot load checkpoint {path} ({type(err).__name__}: {first}): not a checkpoint of "
            f"src.train. {CKPT_PATH_FIX}"
        ) from err


def pick_device(name: str) -> torch.device:
    """`auto`: the GPU when there is one, else the CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def chunks(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """An in-memory tensor in batches."""
    return (images[start : start + batch_size] for start in range(0, len(images), batch_size))


def outputs(
    fn: Callable[[torch.Tensor], torch.Tensor | np.ndarray],
    batches: Iterable[torch.Tensor],
    device: torch.device,
    bf16: bool = False,
    grad: bool = False,
    host: bool = True,
) -> Iterator[torch.Tensor]:
    """`fn` of each batch on `device`, one float32 tensor per batch, as they come: on the CPU,
    or with `host=False` left on `device` (no wait for the device per batch).

    The one inference loop: features, logits and Grad-CAM maps. `grad=False` runs under
    inference mode; `bf16` under bf16 autocast (as a bf16-mixed training run computes).
    """
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    with torch.enable_grad() if grad else torch.inference_mode(), autocast:
        for batch in batches:
            out = torch.as_tensor(fn(batch.to(device, non_blocking=True))).detach().float()
            yield out.cpu() if host else out


def apply(
    fn: Callable[[torch.Tensor], torch.Tensor | np.ndarray],
    batches: Iterable[torch.Tensor],
    device: torch.device,
    bf16: bool = False,
    grad: bool = False,
) -> torch.Tensor:
    """`outputs` concatenated."""
    return torch.cat(list(outputs(fn, batches, device, bf16, grad)))


def logits(
    model: TransferNet, batches: Iterable[torch.Tensor], device: torch.device, bf16: bool = False
) -> torch.Tensor:
    """Class logits (N, classes) of uint8 image batches, or of pooled-feature batches (N, F)."""
    model.eval().to(device)
    return apply(model.logits, batches, device, bf16)


def logits_of_files(
    model: TransferNet,
    paths: list[Path],
    device: torch.device,
    batch_size: int = 64,
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    width: int | None = None,
) -> tuple[torch.Tensor, dict[int, str]]:
    """Class logits (or `fn`'s `width` outputs per image) of image files, decoded in streaming
    batches, and {index: why} for the files that could not be read (their rows are NaN): a bad
    file is a row, not the end of the run."""
    from src.data.images import stream_images

    model.eval().to(device)
    scores = torch.full((len(paths), width or len(model.classes)), float("nan"))
    errors: dict[int, str] = {}
    decoded: list[list[int]] = []  # the indices of each batch `outputs` takes, in order

    def images() -> Iterator[torch.Tensor]:
        for indices, batch, bad in stream_images(
            paths,
            model.image_size,
            batch_size,
            pin_memory=device.type == "cuda",
            resize=model.resize,
        ):
            errors.update(bad)
            if indices:
                decoded.append(indices)
                yield batch

    for out in outputs(fn or model, images(), device):
        scores[decoded.pop(0)] = out
    return scores, errors


def target_layer(model: TransferNet, name: str | None = None) -> nn.Module:
    """The module Grad-CAM reads: `name` (a dotted module name) or the backbone's own choice."""
    name = name or f"backbone.{model.spec.cam_layer}"
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise UserError(
            f"no module {name!r} in the {model.backbone_config['name']} model. Fix: "
            f"target_layer=<a module name in it, e.g. backbone.{model.spec.cam_layer}>, or null "
            "for that default"
        ) from err


def gradcam(
    model: TransferNet,
    batches: Iterable[torch.Tensor],
    targets: list[int],
    layer: nn.Module,
    device: torch.device | None = None,
) -> np.ndarray:
    """Grad-CAM heatmaps (N, H, W) in [0, 1] of uint8 image batches for each image's target class.

    The input requires gradients, so a frozen backbone (no parameter gradients) still has
    gradients at `layer`. Token and NHWC outputs go through the backbone's own reshape.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    device = device or torch.device("cpu")
    model.eval().to(device)
    remaining = iter(targets)
    with GradCAM(model, [layer], reshape_transform=model.spec.cam_reshape) as cam:

        def heatmaps(batch: torch.Tensor) -> np.ndarray:
            wanted = [ClassifierOutputTarget(next(remaining)) for _ in range(len(batch))]
            return cam(batch.float().requires_grad_(), targets=wanted)

        return apply(heatmaps, batches, device, grad=True).numpy()
