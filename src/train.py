"""Train a new head (frozen backbone) or the whole network: `python -m src.train key=value`."""

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from src.data.sampling import class_counts, warn_if_imbalanced
from src.frozen.cache import cached_features
from src.frozen.probe import fit_probe
from src.model.finetune import Finetune
from src.model.module import TransferModel, parameter_summary, trainable_parameters
from src.report.stats import accuracy_ci
from src.report.summary import write_cv
from src.run.callbacks import AtomicCheckpointIO, EpochTimer, RunCheckpoint
from src.run.checkpoints import check_resume, read_checkpoint, run_settings
from src.run.config import check_config
from src.run.errors import UserError, exit_on_user_error, record_failure
from src.run.runtime import (
    MEMORY_FORMATS,
    drop_failing_nvml_check,
    keep_freed_memory,
    quiet_lightning,
    resolve_precision,
)

log = logging.getLogger(__name__)
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")  # absolute: see `__main__` below


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


def frozen_throughout(cfg: DictConfig) -> bool:
    """Whether the backbone never learns in this run (`freeze`, unless a fine-tune overrides)."""
    return Finetune(**cfg.finetune).frozen_throughout(bool(cfg.freeze))


def accelerator(cfg: DictConfig) -> str:
    """`gpu` or `cpu`: what the Trainer's accelerator setting resolves to here."""
    wanted = str(cfg.trainer.get("accelerator", "auto"))
    if wanted in {"gpu", "cuda"} or (wanted == "auto" and torch.cuda.is_available()):
        return "gpu"
    return "cpu"


def hyperparameters(cfg: DictConfig) -> dict[str, Any]:
    """The run's settings, flat, for TensorBoard's HPARAMS tab."""
    return {
        "backbone": cfg.backbone.name,
        "weights": str(cfg.backbone.weights),
        "freeze": frozen_throughout(cfg),
        "finetune": cfg.finetune.name,
        "head_fit": cfg.head_fit,
        "backbone_lr_scale": cfg.finetune.get("backbone_lr_scale", 1.0),
        "scheduler": cfg.scheduler.name,
        "augment": cfg.augment.name,
        "label_smoothing": cfg.label_smoothing,
        "class_weights": str(cfg.class_weights),
        "sampler": cfg.sampler,
        "optimizer": cfg.optimizer._target_.rsplit(".", 1)[-1],
        "lr": cfg.optimizer.lr,
        "batch_size": cfg.batch_size,
        "image_size": cfg.image_size,
        "max_epochs": cfg.trainer.max_epochs,
        "seed": cfg.seed,
    }


def class_weights(cfg: DictConfig, data: Any) -> list[float] | None:
    """`class_weights=auto`: inverse class frequency of the training split, mean 1."""
    if cfg.class_weights is None:
        return None
    counts = class_counts(data.train_split, data.classes)
    return [sum(counts) / (len(counts) * count) for count in counts]


def build_model(cfg: DictConfig, data: Any) -> TransferModel:
    """The network, loss, optimizer and fine-tuning schedule that `cfg` asks for."""
    classes = data.classes
    model = TransferModel(
        backbone=OmegaConf.to_container(cfg.backbone, resolve=True),
        classes=classes,
        image_size=cfg.image_size,
        freeze=cfg.freeze,
        optimizer=instantiate(cfg.optimizer),
        finetune=OmegaConf.to_container(cfg.finetune, resolve=True),
        label_smoothing=cfg.label_smoothing,
        scheduler=instantiate(cfg.scheduler, _convert_="all"),
        class_weights=class_weights(cfg, data),
    )
    if cfg.memory_format != "auto":
        model.memory_format = MEMORY_FORMATS[cfg.memory_format]
    return model


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
    model: TransferModel,
    data: Any,
    features: dict[str, torch.Tensor],
    cfg: DictConfig,
    logger: Any,
    refit: str,
) -> dict[str, float]:
    """Fit `model`'s head as a linear probe on cached features: the L2 strength chosen on the
    val split (fits on train), then refitted at that strength on train+val (`trainval`, every
    image the test never sees) or `train`; log one point per grid value.

    Returns the chosen strength and the val loss and accuracy it was chosen by, which stay
    honest when the refit has seen the val images.
    """
    labels = {name: torch.tensor(split.labels) for name, split in data.splits().items()}
    classes = len(model.hparams.classes)
    fit = fit_probe(
        features["train"],
        labels["train"],
        features["val"],
        labels["val"],
        classes,
        l2_grid=cfg.probe.l2_grid,
        select=cfg.probe.select,
        **({"refit_tol": None} if refit == "trainval" else {}),  # trainval: refitted below
    )
    chosen, sweep = next(p for p in fit.grid if p["l2"] == fit.l2), fit.grid
    if refit == "trainval":
        both = torch.cat([features["train"], features["val"]])
        fit = fit_probe(
            both, torch.cat([labels["train"], labels["val"]]), features["val"], labels["val"],
            classes, l2_grid=[fit.l2],
        )  # fmt: skip
    with torch.no_grad():
        model.head.weight.copy_(fit.weight)
        model.head.bias.copy_(fit.bias)
    if logger:
        for step, point in enumerate(sweep):
            logger.log_metrics({f"probe/{key}": value for key, value in point.items()}, step)
        logger.log_metrics({"probe/chosen_l2": chosen["l2"]}, len(sweep))
    log.info(
        "linear probe: l2=%.3g chosen by val %s (val loss %.4f, val acc %.4f), refitted on %s",
        chosen["l2"],
        cfg.probe.select,
        chosen["val_loss"],
        chosen["val_acc"],
        refit,
    )
    return chosen


def test_intervals(metrics: dict[str, float], n: int) -> dict[str, Any]:
    """The Wilson 95% interval of each test accuracy in `metrics` over `n` images."""
    return {
        f"{name}_ci95": list(accuracy_ci(value, n))
        for name, value in metrics.items()
        if name in ("test/acc", "before/test_acc")
    }


def tested_images(trainer: L.Trainer, data: Any) -> int:
    """How many test images the test metrics cover (all, unless limit_test_batches cuts)."""
    images, limit = len(data.test_split.paths), trainer.limit_test_batches
    if isinstance(limit, int):
        return min(images, limit * data.batch_size)
    return min(images, math.ceil(math.ceil(images / data.batch_size) * limit) * data.batch_size)


def train(cfg: DictConfig) -> float:
    """Test, train, test again; log and checkpoint under `cfg.output_dir`; return the objective."""
    start = time.perf_counter()
    check_config(cfg)
    quiet_lightning()
    drop_failing_nvml_check()
    L.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.output_dir)
    data = instantiate(cfg.data)
    check_resume(cfg.ckpt_path, cfg, data.classes)
    if cfg.class_weights is None and cfg.sampler == "shuffle":
        warn_if_imbalanced(data.train_split, data.classes)
    model = build_model(cfg, data)
    model.record = {"settings": run_settings(cfg), "split": data.split_record()}
    print(parameter_summary(model))
    if cfg.compile:
        model.backbone.compile()
    precision = resolve_precision(cfg.precision, accelerator(cfg))
    cached = use_cached_features(cfg, data)
    fit = head_fit(cfg, cached)
    if fit == "probe" and cfg.ckpt_path:
        raise UserError(
            "head_fit=probe fits the head in one pass and has nothing to resume. "
            "Fix: ckpt_path=null, or head_fit=recipe to resume its epochs"
        )
    timer = EpochTimer()
    checkpoint = RunCheckpoint(
        dirpath=out / "checkpoints",
        filename="best",
        monitor="val/acc",
        mode="max",
        save_last=True,
        last_every_s=cfg.last_ckpt_every_s,
    )
    logger = instantiate(cfg.logger) if cfg.logger else False
    callbacks = [timer, checkpoint] + ([LearningRateMonitor("epoch")] if logger else [])
    if cfg.early_stopping is not None:
        callbacks.append(EarlyStopping("val/loss", patience=cfg.early_stopping, mode="min"))
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        precision=precision,
        logger=logger,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        **({"max_epochs": 1} if fit == "probe" else {}),  # one epoch: validate and checkpoint
    )
    lpft = cfg.finetune.name == "lpft" and not cfg.ckpt_path  # a resumed run has its head
    features = None
    if cached or lpft:
        device = trainer.strategy.root_device
        features = cached_features(
            model, data, model.hparams.backbone, cfg.cache_dir, device, "bf16" in precision
        )
    if cached:
        chunks = trains_on_chunks(trainer, cfg)
        data.use_features(features, whole_epochs=chunks)
        if chunks:
            model.train_on_chunks(data.train_batches())
    if cfg.lr_find:
        from src.run.lr_find import find_lr  # matplotlib's pyplot: only for the finder's plot

        return find_lr(trainer, model, data, out)
    model.test_phase = "before"
    before = trainer.test(model, data, verbose=False)[0]
    model.test_phase = "test"
    probe = None
    if fit == "probe" or lpft:
        # a fine-tune's epochs are chosen on val: its head must not have seen val
        refit = cfg.probe.refit if fit == "probe" else "train"
        probe = fit_head_by_probe(model, data, features, cfg, logger, refit)
        model.fitted_head = fit == "probe"
    trainer.fit(model, data, ckpt_path=cfg.ckpt_path)
    after = trainer.test(model, data, ckpt_path="best", verbose=False)[0]
    best = read_checkpoint(checkpoint.best_model_path, mmap=True)
    n_test = tested_images(trainer, data)
    result = {
        **hyperparameters(cfg),
        "head_fit": fit,
        "probe_l2": probe["l2"] if probe else None,
        **before,
        **after,
        **test_intervals(before | after, n_test),
        "n_test": n_test,
        "split": model.record["split"],
        "trainable_params": sum(p.numel() for p in trainable_parameters(model)),
        "total_params": sum(p.numel() for p in model.parameters()),
        # a probe refitted on train+val has seen val: its val/acc is the one that chose it
        "val/acc": float(best["callbacks"][checkpoint.state_key]["best_model_score"])
        if fit != "probe" or cfg.probe.refit == "train"
        else probe["val_acc"],
        "best_epoch": int(best["epoch"]),
        "first_batch_s": timer.first_batch_s,
        "fit_s": timer.fit_s,
        "first_epoch_s": timer.seconds[0] if timer.seconds else None,
        "mean_epoch_s": sum(timer.seconds) / len(timer.seconds) if timer.seconds else None,
        "wall_s": time.perf_counter() - start,
    }
    if isinstance(logger, TensorBoardLogger):  # the HPARAMS tab, with the final metrics
        logger.log_hyperparams(hyperparameters(cfg), after | before)
    elif logger:
        logger.log_hyperparams(hyperparameters(cfg))
    if trainer.is_global_zero:  # one result under torchrun or srun, where every rank runs this
        report(cfg, result, fit)
        if isinstance(logger, TensorBoardLogger):  # confusion matrix, Grad-CAM
            from src.report.figures import log_final_figures  # matplotlib, Grad-CAM: only when used

            log_final_figures(trainer, model, data, "bf16" in precision)
    return float(result[cfg.objective])


def report(cfg: DictConfig, result: dict[str, Any], fit: str) -> None:
    """Write result.json in the run dir and print the RESULT line."""
    (Path(cfg.output_dir) / "result.json").write_text(json.dumps(result, indent=2))
    finetune = f" finetune={cfg.finetune.name}" if cfg.finetune.name != "none" else ""
    low, high = result["test/acc_ci95"]
    print(
        f"RESULT backbone={cfg.backbone.name} freeze={result['freeze']}{finetune} head_fit={fit} "
        f"before_test_acc={result['before/test_acc']:.4f} test_acc={result['test/acc']:.4f} "
        f"test_acc_ci95=[{low:.4f},{high:.4f}] test_loss={result['test/loss']:.4f}"
    )


CV_METRICS = ["val/acc", "test/acc", "test/balanced_acc", "test/macro_f1", "test/loss"]


def cross_validate(cfg: DictConfig) -> float:
    """`folds=K`: one run per fold in `<run dir>/fold-<i>/` (TensorBoard names them so), then
    cv.csv and cv.md in the run dir; returns the mean objective over the folds.

    Every fold's data is the same folder's, so a frozen backbone's per-image feature cache is
    extracted by the first fold and read by the others.
    """
    out = Path(cfg.output_dir)
    rows = []
    for fold in range(cfg.folds):
        fold_cfg = cfg.copy()
        with open_dict(fold_cfg):
            fold_cfg.folds = None
            fold_cfg.data.folds, fold_cfg.data.fold = cfg.folds, fold
            fold_cfg.output_dir = str(out / f"fold-{fold}")
            if fold_cfg.cache_dir is None:  # one extraction for all folds all the same
                fold_cfg.cache_dir = str(out / "features")
        train(fold_cfg)
        rows.append(json.loads((out / f"fold-{fold}" / "result.json").read_text()))
    metrics = [m for m in dict.fromkeys([cfg.objective, *CV_METRICS]) if m in rows[0]]
    print(write_cv(out, rows, metrics))
    means = {m: sum(row[m] for row in rows) / len(rows) for m in metrics}
    result = (
        hyperparameters(cfg)
        | means
        | {"folds": cfg.folds, "wall_s": sum(r["wall_s"] for r in rows)}
    )
    (out / "result.json").write_text(json.dumps(result, indent=2))  # the job's row in a sweep
    return means[cfg.objective]


def run(cfg: DictConfig) -> float:
    """`train`, or `cross_validate` with `folds` set."""
    if cfg.folds is None:
        return train(cfg)
    check_config(cfg)  # before the first fold: `folds` itself, and what every fold shares
    return cross_validate(cfg)


@exit_on_user_error
@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
@record_failure
def main(cfg: DictConfig) -> float:
    """Command-line entry: Hydra composes `cfg` from conf/ and the overrides."""
    keep_freed_memory()
    return run(cfg)


if __name__ == "__main__":
    # Run the importable src.train's main, not this __main__ copy's: a launcher that pickles the
    # job (joblib) then refers to src.train's functions by name, where pickling them by value
    # fails (cloudpickle collects `torch.classes`, which it cannot pickle). Hydra finds the
    # configs of a function from an imported module by package, hence the absolute CONF_DIR.
    import src.train

    src.train.main()
