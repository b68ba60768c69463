"""Images most likely labelled wrong: each image's class probabilities from two classifiers its
own label never influenced, K-fold linear probes on the cached features (src.frozen.probe, or
src.frozen.label_probe for a multi-label table) and a leave-one-out k-NN vote on the same
features, averaged and ranked by confident learning (cleanlab's `find_label_issues`, Northcutt
et al. 2021; one-vs-rest per label for multi-label).

`labels` is (n,) class indices, or (n, labels) 0/1 rows of a multi-label table."""

import logging
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from cleanlab.filter import find_label_issues
from cleanlab.multilabel_classification.rank import get_label_quality_scores as multilabel_scores
from cleanlab.rank import get_label_quality_scores
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold
from sklearn.model_selection import StratifiedKFold

from src.frozen.label_probe import fit_label_probe
from src.frozen.probe import fit_probe, standardisation
from src.model.metrics import mean_average_precision
from src.quality.neighbours import nearest

log = logging.getLogger(__name__)


def class_sizes(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Images per class, or per label the images on its rarer side (positive, negative)."""
    if labels.ndim == 1:
        return labels.bincount(minlength=num_classes)
    return torch.minimum(labels.sum(0), len(labels) - labels.sum(0))


def rarest(labels: torch.Tensor, num_classes: int) -> int:
    """Images of the rarest class, or of the rarer side of any label."""
    return int(class_sizes(labels, num_classes).min())


def folds_of(labels: torch.Tensor, num_classes: int, folds: int, seed: int) -> Iterator:
    """(fit, held) index arrays of stratified seeded folds (iteratively stratified for label
    rows), no more folds than the rarest class has images."""
    k = max(2, min(folds, rarest(labels, num_classes)))
    kind = MultilabelStratifiedKFold if labels.ndim == 2 else StratifiedKFold
    return kind(n_splits=k, shuffle=True, random_state=seed).split(
        np.zeros((len(labels), 1)), labels.numpy()
    )


def out_of_fold_probabilities(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, folds: int, l2: float, seed: int
) -> np.ndarray:
    """(n, classes) probabilities, each image's from a probe fitted on the other folds (at L2
    strength `l2`): what the image's label never influenced. Softmax over the classes, or one
    sigmoid per label for label rows."""
    probs = np.zeros((len(labels), num_classes))
    for fit_ids, held_ids in folds_of(labels, num_classes, folds, seed):
        fit_ids, held_ids = torch.from_numpy(fit_ids), torch.from_numpy(held_ids)
        fit, held = (features[fit_ids], labels[fit_ids]), (features[held_ids], labels[held_ids])
        options = {"l2_grid": [l2], "tol": 1e-4, "refit_tol": None}
        if labels.ndim == 2:
            probe = fit_label_probe(*fit, *held, **options)
        else:
            probe = fit_probe(*fit, *held, num_classes, **options)
        logits = F.linear(held[0].float(), probe.weight, probe.bias)
        out = logits.sigmoid() if labels.ndim == 2 else logits.softmax(dim=1)
        probs[held_ids.numpy()] = out.double().numpy()
    return probs


def neighbour_votes(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int
) -> np.ndarray:
    """(n, classes) share of each image's k nearest other images (cosine on standardised
    features) in each class: a leave-one-out k-NN classifier, as cleanlab's Datalab builds from
    features. k is capped at the rarest class's images less one, so every class can fill a
    vote."""
    k = max(1, min(k, rarest(labels, num_classes) - 1))
    mean, scale = standardisation(features)
    _, ids = nearest((features.double() - mean) / scale, k)
    return F.one_hot(labels[ids], num_classes).double().mean(dim=1).numpy()


def auditable(labels: torch.Tensor) -> torch.Tensor:
    """The labels of a multi-label table with two images on each side (positive, negative):
    enough for two folds. The rest keep their given values (no doubt) and are logged."""
    counts = class_sizes(labels, labels.shape[1])
    if skipped := (counts < 2).nonzero().flatten().tolist():
        log.warning("label check skips labels %s: fewer than 2 images with or without", skipped)
    return counts >= 2


def label_issues(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    folds: int = 5,
    l2: float = 1.0,
    neighbours: int = 10,
    frac_noise: float = 1.0,
    seed: int = 0,
) -> tuple[list[tuple[int, tuple[int, ...], float]], float]:
    """(index, suggested classes, score) of the images cleanlab finds labelled wrong, most
    likely first, and how far the given labels agree with the probabilities out of fold
    (accuracy; mAP for label rows): the lower, the more clean images the list holds.

    Classes: the mean of the probes' and the k-NN vote's probabilities; suggested the likeliest
    class. Label rows: the probes' (a neighbour shares few of a scene's labels); suggested every
    label at >= 0.5. score = 1 - cleanlab's label quality (self-confidence), in [0, 1].
    `frac_noise` scales how many are listed against the number of wrong labels confident
    learning estimates (cleanlab's argument: > 1 lists more of the images the classifiers doubt,
    for a person to review)."""
    if labels.ndim == 1:
        probs = out_of_fold_probabilities(features, labels, num_classes, folds, l2, seed)
        probs = (probs + neighbour_votes(features, labels, num_classes, neighbours)) / 2
        given, kind = labels.numpy(), {}
        quality = get_label_quality_scores(given, probs, method="self_confidence")
        suggest = [(int(p.argmax()),) for p in probs]
        agreement = float((probs.argmax(1) == given).mean())
    else:
        kept = auditable(labels)
        y = labels[:, kept]
        probs = labels.double().numpy()
        if kept.any():
            probs[:, kept.numpy()] = out_of_fold_probabilities(
                features, y, y.shape[1], folds, l2, seed
            )
        given, kind = [row.nonzero().flatten().tolist() for row in labels], {"multi_label": True}
        quality = multilabel_scores(given, probs)
        suggest = [tuple(np.flatnonzero(p >= 0.5).tolist()) for p in probs]
        agreement = mean_average_precision(torch.from_numpy(probs[:, kept.numpy()]), y.double())
    found = find_label_issues(
        given, probs, frac_noise=frac_noise, return_indices_ranked_by="self_confidence", **kind
    )
    return [(int(i), suggest[i], float(1 - quality[i])) for i in found], agreement
