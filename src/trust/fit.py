"""The end of a training run: fit the temperature on the val split, build what the OOD score
needs, report both and store them in the run's checkpoints (`calibrate_and_store`)."""

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from src.frozen.cache import cached_features
from src.frozen.head import frozen_throughout
from src.frozen.probe import fit_probe
from src.run.callbacks import AtomicCheckpointIO, hard_link
from src.run.checkpoints import RECORD, read_checkpoint
from src.trust.calibration import (
    checked_temperature,
    expected_calibration_error,
    held_out_folds,
)
from src.trust.ood import feature_bank, ood_record, scores

log = logging.getLogger(__name__)
VAL_FOLDS = 5  # held-out val logits of a probe refitted on train+val (`held_out_val_logits`)
TRUST = "trust"  # the key under the checkpoint's RECORD entry: {"temperature", "ood"}


def split_outputs(
    model: Any, data: Any, features: dict[str, torch.Tensor] | None, cfg: DictConfig, bf16: bool
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per split, (pooled features, logits) of the final model. A frozen backbone's features are
    the run's cached ones (or read or extracted into the cache); a fine-tuned backbone's are
    extracted afresh with its final weights."""
    frozen = frozen_throughout(cfg)
    if features is None or not frozen:
        device = next(model.parameters()).device
        cache_dir = cfg.cache_dir if frozen else None
        features = cached_features(model, data, model.hparams.backbone, cache_dir, device, bf16)
    head = model.head.float().cpu()
    with torch.inference_mode():
        return {name: (f, head(f.float())) for name, f in features.items()}


def held_out_val_logits(
    outputs: dict[str, tuple[torch.Tensor, torch.Tensor]],
    labels: dict[str, torch.Tensor],
    cfg: DictConfig,
    probe: dict[str, float] | None,
) -> torch.Tensor:
    """The val logits of heads that never saw the image: the final head's, except where a probe
    was refitted on train+val (`probe.refit=trainval`). Then each of `VAL_FOLDS` folds of val
    gets the logits of a probe fitted, at the chosen strength, on train and the other folds:
    heads like the final one, which saw nearly as much. (On the embedded data the probe fitted
    on train alone gave T = 0.99 and test ECE 0.0617 against 0.0609 at T = 1; these folds
    T = 0.86, test ECE 0.058.)"""
    (val_features, val_logits), train_features = outputs["val"], outputs["train"][0]
    if probe is None or cfg.head_fit != "probe" or cfg.probe.refit != "trainval":
        return val_logits
    held_out = torch.empty_like(val_logits)
    for out, rest in held_out_folds(len(val_logits), VAL_FOLDS):
        fit = fit_probe(
            torch.cat([train_features, val_features[rest]]),
            torch.cat([labels["train"], labels["val"][rest]]),
            val_features[out], labels["val"][out], val_logits.shape[1], l2_grid=[probe["l2"]],
        )  # fmt: skip
        held_out[out] = val_features[out].float() @ fit.weight.T + fit.bias
    return held_out


def trust_record(
    outputs: dict[str, tuple[torch.Tensor, torch.Tensor]], labels: dict[str, torch.Tensor],
    cfg: DictConfig,
    probe: dict[str, float] | None,
) -> tuple[dict[str, Any], dict[str, float]]:  # fmt: skip
    """The checkpoint's trust entry and the figures result.json reports: the temperature is
    fitted on the val split only (`held_out_val_logits`, `checked_temperature`); the threshold
    keeps `ood.coverage` of it."""
    val_logits, test_logits = held_out_val_logits(outputs, labels, cfg, probe), outputs["test"][1]
    temperature = checked_temperature(val_logits, labels["val"]) if cfg.calibrate else 1.0
    record: dict[str, Any] = {"temperature": temperature}
    ece = {
        "test/ece_before_calibration": expected_calibration_error(
            test_logits.softmax(1), labels["test"]
        ),
        "test/ece_after_calibration": expected_calibration_error(
            (test_logits / temperature).softmax(1), labels["test"]
        ),
        "temperature": temperature,
    }
    if not cfg.ood:
        return record, ece
    kind, k = cfg.ood.score, cfg.ood.k
    train = outputs["train"][0]
    bank = feature_bank(train, cfg.ood.max_features) if kind == "knn" else None
    val = scores(kind, val_logits, temperature, outputs["val"][0], bank, k)
    record["ood"] = ood_record(kind, k, cfg.ood.coverage, val, bank)
    test = scores(kind, test_logits, temperature, outputs["test"][0], bank, k)
    flagged = float((test > record["ood"]["threshold"]).float().mean())
    return record, ece | {"ood/score": kind, "ood/test_unknown": flagged}


def store(record: dict[str, Any], best: Path, last: Path) -> int:
    """Write `record` into best.ckpt's RECORD entry, and into last.ckpt where it holds the same
    weights (else last.ckpt is a later state the record does not describe). Atomic writes; a
    last.ckpt hard-linked to best.ckpt stays one file. Returns the bytes best.ckpt grew by."""
    before = best.stat().st_size
    linked = last.is_file() and last.samefile(best)
    best_ckpt = read_checkpoint(best)
    targets = [(best, best_ckpt)]
    if last.is_file() and not linked:
        last_ckpt = read_checkpoint(last)
        same = last_ckpt["state_dict"].keys() == best_ckpt["state_dict"].keys() and all(
            torch.equal(v, best_ckpt["state_dict"][key])
            for key, v in last_ckpt["state_dict"].items()
        )
        if same:
            targets.append((last, last_ckpt))
        else:
            log.info("%s holds later weights than best.ckpt: no calibration stored in it", last)
    for path, ckpt in targets:
        ckpt[RECORD] = {**ckpt.get(RECORD, {}), TRUST: record}
        AtomicCheckpointIO().save_checkpoint(ckpt, path)
    if linked and not hard_link(best, last):
        AtomicCheckpointIO().save_checkpoint(best_ckpt, last)
    return best.stat().st_size - before


def calibrate_and_store(
    cfg: DictConfig,
    trainer: L.Trainer,
    model: Any,
    data: Any,
    features: dict[str, torch.Tensor] | None,
    checkpoint: Any,
    probe: dict[str, float] | None,
    bf16: bool,
) -> dict[str, Any]:
    """After the final test: rank 0 fits the temperature and the OOD threshold on the best
    weights, stores them in best.ckpt (and last.ckpt) and returns the figures for result.json;
    every rank gets the same figures. `calibrate=false ood=false`: nothing; a multi-label model
    (independent sigmoids, thresholds chosen on val instead): nothing, said once.

    The best weights are read from best.ckpt: ddp_spawn's main process holds the last fit's,
    its ranks having run the test."""
    if not cfg.calibrate and not cfg.ood:
        return {}
    if getattr(model, "task", "multiclass") == "multilabel":
        log.info("calibration and unknown are for exclusive classes: a multi-label run skips them")
        return {}
    figures: dict[str, Any] | None = None
    if trainer.is_global_zero:
        device = next(model.parameters()).device
        best = read_checkpoint(checkpoint.best_model_path, mmap=True)
        model.load_state_dict(best["state_dict"])
        outputs = split_outputs(model, data, features, cfg, bf16)
        model.to(device)
        labels = {name: torch.tensor(split.labels) for name, split in data.splits().items()}
        record, figures = trust_record(outputs, labels, cfg, probe)
        last = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}.ckpt"
        figures["trust_ckpt_bytes"] = store(record, Path(checkpoint.best_model_path), last)
        log.info("calibration and OOD data stored in %s: %s", checkpoint.best_model_path, figures)
    return trainer.strategy.broadcast(figures)
