"""Multi-label metrics on sigmoid probabilities: average precision per label and its mean (mAP,
threshold-free), per-label thresholds chosen on the val split (the F1-best cut of each label),
and at those thresholds micro/macro F1, subset accuracy and Hamming loss."""

import torch
from torch import nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from torchmetrics.functional.classification import (
    binary_average_precision,
    multilabel_average_precision,
)
from torchmetrics.utilities import dim_zero_cat

DEFAULT_THRESHOLD = 0.5  # a label without a positive val image: no cut can be chosen


def average_precision(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per label, the average precision of `probs` (n, labels) for 0/1 `targets` (as
    scikit-learn's average_precision_score); NaN for a label with no positive."""
    ap = torch.full((probs.shape[1],), float("nan"), dtype=torch.float64)
    present = (targets > 0).any(0)
    scores, truth = probs[:, present].float(), (targets[:, present] > 0).long()
    if truth.shape[1] == 1:  # torchmetrics' multi-label form needs two labels or more
        ap[present] = binary_average_precision(scores[:, 0], truth[:, 0]).to(torch.float64)
    elif truth.shape[1] > 1:
        ap[present] = multilabel_average_precision(
            scores, truth, num_labels=truth.shape[1], average=None, thresholds=None
        ).to(torch.float64)
    return ap


def mean_average_precision(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """mAP: the mean of the per-label AP over the labels with a positive (NaN if none has)."""
    return average_precision(probs, targets).nanmean().item()


def choose_thresholds(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per label, the cut of `probs` (val predictions) with the highest F1 on `targets`: a
    label is predicted where its probability is >= the cut. The cut lies halfway between the
    lowest probability kept and the next one below; DEFAULT_THRESHOLD for a label without a
    positive. Ties in F1 go to the higher cut (fewer positives)."""
    n, labels = probs.shape
    thresholds = torch.full((labels,), DEFAULT_THRESHOLD, dtype=torch.float64)
    for k in range(labels):
        positives = int((targets[:, k] > 0).sum())
        if positives == 0:
            continue
        scores, order = probs[:, k].double().sort(descending=True)
        hits = (targets[order, k] > 0).double().cumsum(0)
        kept = torch.arange(1, n + 1, dtype=torch.float64)
        f1 = 2 * hits / (kept + positives)
        group_end = torch.ones(n, dtype=torch.bool)  # a cut keeps whole groups of tied scores
        group_end[:-1] = scores[:-1] != scores[1:]
        f1[~group_end] = -1.0
        best = int(f1.argmax())
        below = scores[best + 1].item() if best + 1 < n else 0.0
        thresholds[k] = (scores[best].item() + below) / 2
    return thresholds


def f1_parts(predicted: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per label the true positives, predicted and actual positives (float64)."""
    truth = targets > 0
    return {
        "tp": (predicted & truth).sum(0).double(),
        "predicted": predicted.sum(0).double(),
        "support": truth.sum(0).double(),
    }


def ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1e-300), 0.0)


def multilabel_metrics(
    probs: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor
) -> dict[str, float]:
    """mAP, micro and macro F1, subset accuracy and Hamming loss of `probs` at `thresholds`."""
    predicted = probs.double() >= thresholds.double()
    parts = f1_parts(predicted, targets)
    f1 = ratio(2 * parts["tp"], parts["predicted"] + parts["support"])
    micro = ratio(2 * parts["tp"].sum(), parts["predicted"].sum() + parts["support"].sum())
    truth = targets > 0
    return {
        "mAP": mean_average_precision(probs, targets),
        "micro_f1": micro.item(),
        "macro_f1": f1.mean().item(),
        "subset_acc": (predicted == truth).all(1).double().mean().item(),
        "hamming_loss": (predicted != truth).double().mean().item(),
    }


def per_label_metrics(
    probs: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor, classes: list[str]
) -> list[dict[str, float | str]]:
    """Per label: AP, precision, recall and F1 at its threshold, support, the threshold."""
    predicted = probs.double() >= thresholds.double()
    parts = f1_parts(predicted, targets)
    precision = ratio(parts["tp"], parts["predicted"])
    recall = ratio(parts["tp"], parts["support"])
    f1 = ratio(2 * parts["tp"], parts["predicted"] + parts["support"])
    ap = average_precision(probs, targets)
    return [
        {
            "label": name,
            "ap": ap[k].item(),
            "precision": precision[k].item(),
            "recall": recall[k].item(),
            "f1": f1[k].item(),
            "support": int(parts["support"][k]),
            "threshold": thresholds[k].item(),
        }
        for k, name in enumerate(classes)
    ]


class LabelScores(Metric):
    """Every image's sigmoid probabilities and 0/1 targets of an epoch (gathered over DDP
    ranks); computes the mAP, and gives them all for the thresholded metrics (`gathered`)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.probs.append(logits.detach().float().sigmoid())
        self.targets.append(targets.detach().float())

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The epoch's probabilities and targets, from every rank."""
        with self.sync_context(should_unsync=True):
            return dim_zero_cat(self.probs), dim_zero_cat(self.targets)

    def compute(self) -> torch.Tensor:
        probs, targets = dim_zero_cat(self.probs), dim_zero_cat(self.targets)
        return torch.tensor(mean_average_precision(probs, targets))


def stage_metrics(task: str, classes: int) -> nn.ModuleDict:
    """Per stage (train, val, test) the metrics a run logs: the loss, and for multi-class the
    accuracy (test: also balanced accuracy and macro F1), for multi-label the mAP (test: the
    thresholded ones are computed from the gathered scores, see TransferModel)."""

    def metrics(stage: str) -> dict[str, Metric]:
        if task == "multilabel":
            return {"loss": MeanMetric(), "mAP": LabelScores()}
        return {
            "loss": MeanMetric(),
            "acc": MulticlassAccuracy(classes, average="micro"),
            **(
                {
                    "balanced_acc": MulticlassAccuracy(classes, average="macro"),
                    "macro_f1": MulticlassF1Score(classes, average="macro"),
                }
                if stage == "test"
                else {}
            ),
        }

    return nn.ModuleDict(
        {f"{stage}_metrics": nn.ModuleDict(metrics(stage)) for stage in ("train", "val", "test")}
    )
