"""What src.predict and src.eval show of a checkpoint's images: calibrated probabilities and, where
the checkpoint stores what its OOD score needs, the score and whether each image is `unknown`."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from src.model.inference import logits_of_files
from src.model.network import TransferNet
from src.trust.ood import unknown

NO_TRUST = (
    "{ckpt} stores no temperature or OOD data (written before src.train stored them): "
    "probabilities are uncalibrated and `unknown` is absent. Fix: retrain it to get both"
)
NO_OOD = "{ckpt} was trained with ood=false: `unknown` is absent. Fix: retrain without ood=false"


@dataclass
class Trusted:
    """Per image: logits, calibrated probabilities, and the OOD score and flag (None when the
    checkpoint has no OOD data or `ood=false`); the threshold used and a note on what is absent."""

    logits: torch.Tensor
    probs: torch.Tensor
    temperature: float
    score: torch.Tensor | None = None
    unknown: torch.Tensor | None = None
    threshold: float | None = None
    coverage: float | None = None
    note: str | None = None


def trusted_outputs(
    model: TransferNet,
    paths: list[Path],
    device: torch.device,
    ckpt: str,
    ood: Any = True,
    batch_size: int = 64,
) -> tuple[Trusted, dict[int, str]]:
    """`Trusted` outputs of image files and {index: why} for those that could not be read.

    `ood`: false for no OOD check, else settings whose `coverage` (null: the checkpoint's)
    moves the threshold to keep that share of the val split.
    """
    trust = model.record.get("trust")
    record = trust.get("ood") if trust and ood is not False else None
    fn, width, classes = None, None, len(model.classes)
    if record is not None and record["score"] == "knn":

        def fn(images: torch.Tensor) -> torch.Tensor:
            features = model.features(images)
            return torch.cat([model.head(features), features.float()], 1)

        width = classes + model.head.in_features
    rows, errors = logits_of_files(model, paths, device, batch_size, fn, width)
    logits, features = rows[:, :classes], rows[:, classes:]
    temperature = float(trust["temperature"]) if trust else 1.0
    out = Trusted(logits, (logits.nan_to_num(0) / temperature).softmax(1), temperature)
    if trust is None:
        out.note = NO_TRUST.format(ckpt=ckpt)
    elif ood is not False and record is None:
        out.note = NO_OOD.format(ckpt=ckpt)
    if record is not None:
        coverage = ood.get("coverage") if hasattr(ood, "get") else None
        out.coverage = record["coverage"] if coverage is None else coverage
        out.score, out.unknown, out.threshold = unknown(
            record, logits.nan_to_num(0), features.nan_to_num(0), temperature, coverage
        )
    return out, errors
