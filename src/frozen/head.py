"""How a run's head learns when the backbone is frozen: on cached features or on images, by the
linear probe or by the recipe (the configured optimizer and epochs), one Lightning step per
minibatch or per epoch. `HeadPlan.of` decides once; the run then asks it to prepare the data
and model (`prepare`) and to fit the head before training (`fit_before_training`)."""

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from src.frozen.cache import cached_features
from src.frozen.label_probe import fit_label_probe
from src.frozen.probe import fit_probe
from src.model.finetune import Finetune
from src.run.errors import UserError

log = logging.getLogger(__name__)
CPU = torch.device("cpu")
PROBE_GPU_ROWS = 4096  # training rows from which the probe fits on the run's GPU


def frozen_throughout(cfg: DictConfig) -> bool:
    """Whether the backbone never learns in this run (`freeze`, unless a fine-tune overrides)."""
    return Finetune(**cfg.finetune).frozen_throughout(bool(cfg.freeze))


def use_cached_features(cfg: DictConfig, data: Any) -> bool:
    """Whether to train the head on precomputed features (frozen backbone, no augmentation)."""
    possible = frozen_throughout(cfg) and data.train_transform is None
    if cfg.cache_features == "auto":
        return possible
    if cfg.cache_features and not possible:
        raise UserError(
            "cache_features=true needs a backbone frozen for the whole run and no augmentation. "
            "Fix: cache_features=auto, or freeze=true finetune=none augment=none"
        )
    return bool(cfg.cache_features)


def trains_on_chunks(trainer: L.Trainer, cfg: DictConfig) -> bool:
    """Whether a run on cached features can take each epoch's minibatches in one Lightning step
    (FeatureChunks): one process, no Trainer setting that counts or cuts minibatches
    (clipping, accumulation, batch limits, max_steps, mid-epoch validation, the lr finder), no
    gradient scaler (16-mixed on a GPU), and no scheduler that Lightning steps per epoch (a
    plateau), which manual optimization skips."""
    limits = (trainer.limit_train_batches, trainer.limit_val_batches, trainer.limit_test_batches)
    return (
        trainer.world_size == 1
        and not trainer.gradient_clip_val
        and trainer.accumulate_grad_batches == 1
        and trainer.max_steps == -1
        and not trainer.overfit_batches
        and all(isinstance(limit, float) and limit == 1.0 for limit in limits)
        and trainer.val_check_interval == 1.0
        and not cfg.lr_find
        and getattr(trainer.precision_plugin, "scaler", None) is None
        and cfg.scheduler.get("interval") != "epoch"
    )


def head_fit(cfg: DictConfig, cached: bool) -> str:
    """`probe` or `recipe`: how this run fits a head that learns alone for the whole run.

    The probe needs the cached features; with augmentation they cannot be cached, so the head
    trains by the recipe (the configured optimizer and epochs), said once.
    """
    if cfg.head_fit == "recipe" or not frozen_throughout(cfg):
        return "recipe"
    if not cached:
        log.warning(
            "head_fit=probe fits the head on cached features, which augmentation (or "
            "cache_features=false) rules out: the head trains with the recipe instead"
        )
        return "recipe"
    return "probe"


def fit_head_by_probe(
    model: Any,
    data: Any,
    features: dict[str, torch.Tensor],
    cfg: DictConfig,
    logger: Any,
    refit: str,
    device: torch.device = CPU,
) -> dict[str, float]:
    """Fit `model`'s head as a linear probe on cached features: the L2 strength chosen on the
    val split (fits on train), then refitted at that strength on train+val (`trainval`, every
    image the test never sees) or `train`; log one point per grid value. On `device` (a GPU)
    from PROBE_GPU_ROWS training rows, where its full-batch steps outrun the CPU's.

    Returns the chosen strength and the val loss and accuracy it was chosen by, which stay
    honest when the refit has seen the val images.
    """
    if device.type == "cpu" or len(features["train"]) < PROBE_GPU_ROWS:
        device = CPU
    features = {name: x.to(device) for name, x in features.items()}
    labels = {name: torch.tensor(s.labels, device=device) for name, s in data.splits().items()}
    multilabel = model.hparams.get("task") == "multilabel"
    fit_any = (
        fit_label_probe
        if multilabel
        else partial(fit_probe, num_classes=len(model.hparams.classes))
    )
    if cfg.probe.select == ("acc" if multilabel else "mAP"):
        task, fit = ("multi-label", "mAP") if multilabel else ("multi-class", "acc")
        raise UserError(
            f"probe.select={cfg.probe.select} does not score a {task} probe. "
            f"Fix: probe.select=loss or probe.select={fit}"
        )
    fit = fit_any(
        features["train"],
        labels["train"],
        features["val"],
        labels["val"],
        l2_grid=cfg.probe.l2_grid,
        select=cfg.probe.select,
        **({"refit_tol": None} if refit == "trainval" else {}),  # trainval: refitted below
    )
    chosen, sweep = next(p for p in fit.grid if p["l2"] == fit.l2), fit.grid
    if refit == "trainval":
        both = torch.cat([features["train"], features["val"]])
        fit = fit_any(
            both, torch.cat([labels["train"], labels["val"]]), features["val"], labels["val"],
            l2_grid=[fit.l2],
        )  # fmt: skip
    with torch.no_grad():
        model.head.weight.copy_(fit.weight)
        model.head.bias.copy_(fit.bias)
    if logger:
        for step, point in enumerate(sweep):
            logger.log_metrics({f"probe/{key}": value for key, value in point.items()}, step)
        logger.log_metrics({"probe/chosen_l2": chosen["l2"]}, len(sweep))
    score = "val_mAP" if multilabel else "val_acc"
    log.info(
        "linear probe: l2=%.3g chosen by val %s (val loss %.4f, %s %.4f), refitted on %s",
        chosen["l2"],
        cfg.probe.select,
        chosen["val_loss"],
        score,
        chosen[score],
        refit,
    )
    return chosen


@dataclass(frozen=True)
class HeadPlan:
    """How the head learns in one run.

    `cached`: the head trains on features extracted once (frozen backbone, no augmentation);
    `fit`: `probe` (fitted in closed form, the one epoch only validates and checkpoints it) or
    `recipe`; `lpft`: a linear probe fits the head before the backbone is fine-tuned.
    """

    cached: bool
    fit: str
    lpft: bool

    @classmethod
    def of(cls, cfg: DictConfig, data: Any) -> "HeadPlan":
        """The plan `cfg` asks for, or a UserError where it cannot hold."""
        cached = use_cached_features(cfg, data)
        fit = head_fit(cfg, cached)
        if fit == "probe" and cfg.ckpt_path:
            raise UserError(
                "head_fit=probe fits the head in one pass and has nothing to resume. "
                "Fix: ckpt_path=null, or head_fit=recipe to resume its epochs"
            )
        lpft = cfg.finetune.name == "lpft" and not cfg.ckpt_path  # a resumed run has its head
        return cls(cached, fit, lpft)

    @property
    def epochs(self) -> dict[str, int]:
        """Trainer overrides: a probed head's run is one epoch, to validate and checkpoint it."""
        return {"max_epochs": 1} if self.fit == "probe" else {}

    def prepare(
        self, model: Any, data: Any, trainer: L.Trainer, cfg: DictConfig, bf16: bool
    ) -> dict[str, torch.Tensor] | None:
        """Extract (or read from the cache) the features the plan needs and hand them to the
        data module; where one Lightning step per epoch can take the epoch's minibatches,
        switch the model to it. Returns the features per split, or None."""
        if not (self.cached or self.lpft):
            return None
        device = trainer.strategy.root_device
        features = cached_features(
            model, data, model.hparams.backbone, cfg.cache_dir, device, bf16, cfg.batch_size
        )
        if self.cached:
            chunks = trains_on_chunks(trainer, cfg)
            data.use_features(features, whole_epochs=chunks)
            if chunks:
                model.train_on_chunks(data.train_batches())
        return features

    def fit_before_training(
        self,
        model: Any,
        data: Any,
        features: dict[str, torch.Tensor] | None,
        cfg: DictConfig,
        logger: Any,
        trainer: L.Trainer,
    ) -> dict[str, float] | None:
        """Fit the head by the probe where the plan says so (the probe itself, or lpft's first
        stage), on the run's device when it trains in one process; returns the probe's choice,
        or None. A fine-tune's epochs are chosen on val, so its head is refitted on train only."""
        if self.fit != "probe" and not self.lpft:
            return None
        refit = cfg.probe.refit if self.fit == "probe" else "train"
        device = trainer.strategy.root_device if trainer.world_size == 1 else CPU
        probe = fit_head_by_probe(model, data, features, cfg, logger, refit, device)
        if self.fit == "probe":
            model.keep_fitted_head()
        return probe
