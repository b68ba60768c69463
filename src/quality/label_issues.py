"""Images most likely labelled wrong: out-of-fold class probabilities from K linear probes on the
cached features (src.frozen.probe), ranked by confident learning (cleanlab's
`find_label_issues`, Northcutt et al. 2021)."""

import numpy as np
import torch
import torch.nn.functional as F
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores
from sklearn.model_selection import StratifiedKFold

from src.frozen.probe import fit_probe


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


def label_issues(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    folds: int = 5,
    l2: float = 1.0,
    seed: int = 0,
) -> list[tuple[int, int, float]]:
    """(index, suggested class, score) of the images cleanlab finds labelled wrong, most likely
    first; score = 1 - the label's self-confidence (the out-of-fold probability of the given
    label), in [0, 1]."""
    probs = out_of_fold_probabilities(features, labels, num_classes, folds, l2, seed)
    given = labels.numpy()
    found = find_label_issues(given, probs, return_indices_ranked_by="self_confidence")
    quality = get_label_quality_scores(given, probs, method="self_confidence")
    return [(int(i), int(probs[i].argmax()), float(1 - quality[i])) for i in found]
