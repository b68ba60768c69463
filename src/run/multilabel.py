"""What a multi-label training run adds to src.train: per-label positive weights, the rare-label
warning, the per-label thresholds chosen on val (stored in the best checkpoint) and its results
(mAP with a bootstrap interval, the thresholded metrics, the RESULT line)."""

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

from src.frozen.batches import minibatches
from src.model.metrics import choose_thresholds, mean_average_precision
from src.run.callbacks import AtomicCheckpointIO
from src.run.checkpoints import RECORD, read_checkpoint
from src.run.errors import UserError

log = logging.getLogger(__name__)
RESULT_METRICS = ("mAP", "micro_f1", "macro_f1", "subset_acc", "hamming_loss", "loss")


def is_multilabel(data: Any) -> bool:
    """Whether `data` (a data module) gives several labels per image."""
    return getattr(data, "task", "multiclass") == "multilabel"


def label_targets(data: Any, split: str = "train") -> torch.Tensor:
    """The (images, labels) 0/1 matrix of a split."""
    return torch.tensor(data.splits()[split].labels, dtype=torch.float64)


def positive_weights(data: Any) -> list[float]:
    """`class_weights=auto` for multi-label: each label's negatives per positive in the training
    split, BCEWithLogitsLoss's pos_weight (a label in 1 of 10 images weighs its positives 9)."""
    targets = label_targets(data)
    positives = targets.sum(0)
    return ((len(targets) - positives) / positives.clamp(min=1)).tolist()


def warn_rare_labels(data: Any, ratio: float = 3.0) -> None:
    """One warning naming the labels with `ratio` times fewer training positives than the most
    common label, with the fix."""
    counts = label_targets(data).sum(0)
    rare = [(name, int(c)) for name, c in zip(data.classes, counts, strict=True)
            if c * ratio <= counts.max()]  # fmt: skip
    if rare:
        named = ", ".join(f"{name} ({count})" for name, count in rare)
        log.warning(
            "rare labels: %s training images, where %s has %d. Consider class_weights=auto "
            "(each label's positives weighed by its negatives per positive)",
            named,
            data.classes[int(counts.argmax())],
            int(counts.max()),
        )


def check_run(cfg: Any, data: Any) -> None:
    """A UserError for a setting that has no multi-label meaning; the rare-label warning."""
    if cfg.label_smoothing:
        raise UserError("label_smoothing is for one label per image. Fix: label_smoothing=0")
    if cfg.class_weights is None:
        warn_rare_labels(data)


@torch.no_grad()
def split_scores(model: Any, data: Any, split: str = "val") -> tuple[torch.Tensor, torch.Tensor]:
    """The model's sigmoid probabilities and the targets of every image of `split` (val or
    test; features or images, as the data module serves them), in this process."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    probs, targets = [], []
    for batch in getattr(data, f"{split}_dataloader")():
        for x, y in minibatches(batch):
            probs.append(model.logits(x.to(device)).float().sigmoid().cpu())
            targets.append(y.float())
    model.train(was_training)
    return torch.cat(probs), torch.cat(targets)


def fit_thresholds(trainer: L.Trainer, model: Any, data: Any, best_path: str) -> torch.Tensor:
    """Per label, the F1-best cut of the best checkpoint's val probabilities: set on `model` and
    written into that checkpoint (its record), which the test then loads. Val only: the test
    images never choose them."""
    ckpt = read_checkpoint(best_path)
    model.load_state_dict(ckpt["state_dict"])
    thresholds = choose_thresholds(*split_scores(model, data, "val"))
    model.set_thresholds(thresholds)
    if trainer.is_global_zero:
        ckpt[RECORD]["thresholds"] = thresholds.tolist()
        AtomicCheckpointIO().save_checkpoint(ckpt, Path(best_path))
    trainer.strategy.barrier()
    return thresholds


def bootstrap_interval(
    probs: torch.Tensor, targets: torch.Tensor, draws: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """The 95% percentile bootstrap interval of the mAP over the test images (resampled with
    replacement, seeded)."""
    generator = torch.Generator().manual_seed(seed)
    n = len(probs)
    values = []
    for _ in range(draws):
        rows = torch.randint(0, n, (n,), generator=generator)
        values.append(mean_average_precision(probs[rows], targets[rows]))
    values = torch.tensor(values, dtype=torch.float64)
    values = values[~values.isnan()]
    low, high = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return low.item(), high.item()


def multilabel_result(model: Any, data: Any, seed: int) -> dict[str, Any]:
    """The test mAP's bootstrap interval and the thresholds, for result.json. The test scores
    are those of the run's test where this process ran it; ddp_spawn's ranks ran it in their
    own processes, so its main process scores the test split itself (the best weights)."""
    scores = model.last_test_scores
    probs, targets = scores if scores is not None else split_scores(model, data, "test")
    return {
        "test/mAP_ci95": list(bootstrap_interval(probs.cpu(), targets.cpu(), seed=seed)),
        "thresholds": dict(zip(model.hparams.classes, model.thresholds.tolist(), strict=True)),
    }


def result_line(prefix: str, result: dict[str, Any]) -> str:
    """The RESULT line of a multi-label run: `prefix` (backbone, freeze, ...) then the metrics."""
    low, high = result["test/mAP_ci95"]
    metrics = " ".join(f"test_{m}={result[f'test/{m}']:.4f}" for m in RESULT_METRICS)
    return (
        f"{prefix} task=multilabel before_test_mAP={result['before/test_mAP']:.4f} {metrics} "
        f"test_mAP_ci95=[{low:.4f},{high:.4f}]"
    )
