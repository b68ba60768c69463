"""Images most likely labelled wrong: each image's class probabilities from two classifiers its
own label never influenced, K-fold linear probes on the cached features (src.frozen.probe) and a
leave-one-out k-NN vote on the same features, averaged and ranked by confident learning
(cleanlab's `find_label_issues`, Northcutt et al. 2021)."""

import numpy as np
import torch
import torch.nn.functional as F
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores
from sklearn.model_selection import StratifiedKFold

from src.frozen.probe import fit_probe, standardisation
from src.quality.neighbours import nearest


def out_of_fold_probabilities(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, folds: int, l2: float, seed: int
) -> np.ndarray:
    """(n, classes) probabilities, each image's from a probe fitted on the other folds (at L2
    strength `l2`, stratified seeded folds): what the image's label never influenced."""
    probs = np.zeros((len(labels), num_classes))
    k = max(2, min(folds, int(labels.bincount(minlength=num_classes).min())))
    splitter = StratifiedKFold(k, shuffle=True, random_state=seed)
    for fit_ids, held_ids in splitter.split(np.zeros(len(labels)), labels.numpy()):
        fit_ids, held_ids = torch.from_numpy(fit_ids), torch.from_numpy(held_ids)
        probe = fit_probe(
            features[fit_ids],
            labels[fit_ids],
            features[held_ids],
            labels[held_ids],
            num_classes,
            l2_grid=[l2],
            tol=1e-4,
            refit_tol=None,
        )
        logits = F.linear(features[held_ids].float(), probe.weight, probe.bias)
        probs[held_ids.numpy()] = logits.softmax(dim=1).double().numpy()
    return probs


def neighbour_votes(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int
) -> np.ndarray:
    """(n, classes) share of each image's k nearest other images (cosine on standardised
    features) in each class: a leave-one-out k-NN classifier, as cleanlab's Datalab builds from
    features. k is capped at the smallest class's size less one, so every class can fill a vote."""
    k = max(1, min(k, int(labels.bincount(minlength=num_classes).min()) - 1))
    mean, scale = standardisation(features)
    _, ids = nearest((features.double() - mean) / scale, k)
    return F.one_hot(labels[ids], num_classes).double().mean(dim=1).numpy()


def label_issues(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    folds: int = 5,
    l2: float = 1.0,
    neighbours: int = 10,
    frac_noise: float = 1.0,
    seed: int = 0,
) -> list[tuple[int, int, float]]:
    """(index, suggested class, score) of the images cleanlab finds labelled wrong, most likely
    first, from the mean of the probes' and the k-NN's probabilities; score = 1 - the label's
    self-confidence (its mean probability), in [0, 1]. `frac_noise` scales how many are listed
    against the number of wrong labels confident learning estimates (cleanlab's argument: > 1
    lists more of the images the classifiers doubt, for a person to review)."""
    probs = out_of_fold_probabilities(features, labels, num_classes, folds, l2, seed)
    probs = (probs + neighbour_votes(features, labels, num_classes, neighbours)) / 2
    given = labels.numpy()
    found = find_label_issues(
        given, probs, frac_noise=frac_noise, return_indices_ranked_by="self_confidence"
    )
    quality = get_label_quality_scores(given, probs, method="self_confidence")
    return [(int(i), int(probs[i].argmax()), float(1 - quality[i])) for i in found]
