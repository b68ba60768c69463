"""Train a new head (frozen backbone) or the whole network: `python -m src.train key=value`."""

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from src.data.sampling import class_counts, warn_if_imbalanced
from src.frozen.head import HeadPlan, frozen_throughout
from src.model.module import TransferModel, parameter_summary, trainable_parameters
from src.quality.leaks import warn_if_leaks
from src.report.stats import accuracy_ci
from src.report.summary import result_objective, write_cv
from src.run import multilabel as ml
from src.run.callbacks import AtomicCheckpointIO, EpochTimer, RunCheckpoint
from src.run.checkpoints import check_resume, read_checkpoint, run_settings
from src.run.config import check_config
from src.run.devices import accelerator, compile_backbone, trainer_settings
from src.run.errors import exit_on_user_error, record_failure
from src.run.runtime import (
    MEMORY_FORMATS,
    drop_failing_nvml_check,
    keep_freed_memory,
    quiet_lightning,
    resolve_precision,
)
from src.trust.fit import calibrate_and_store

log = logging.getLogger(__name__)
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")  # absolute: see `__main__` below


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
    """`class_weights=auto`: inverse class frequency of the training split, mean 1 (multi-label:
    each label's pos_weight)."""
    if cfg.class_weights is None:
        return None
    if ml.is_multilabel(data):
        return ml.positive_weights(data)
    counts = class_counts(data.train_split, data.classes)
    return [sum(counts) / (len(counts) * count) for count in counts]


def build_model(cfg: DictConfig, data: Any) -> TransferModel:
    """The network, loss, optimizer and fine-tuning schedule that `cfg` asks for, with the run's
    record (settings and split) that its checkpoints carry."""
    model = TransferModel(
        backbone=OmegaConf.to_container(cfg.backbone, resolve=True),
        classes=data.classes,
        image_size=cfg.image_size,
        resize=data.resize,
        freeze=cfg.freeze,
        optimizer=instantiate(cfg.optimizer),
        finetune=OmegaConf.to_container(cfg.finetune, resolve=True),
        label_smoothing=cfg.label_smoothing,
        scheduler=instantiate(cfg.scheduler, _convert_="all"),
        class_weights=class_weights(cfg, data),
        record={"settings": run_settings(cfg), "split": data.split_record()},
        **({"task": "multilabel"} if ml.is_multilabel(data) else {}),
    )
    if cfg.memory_format != "auto":
        model.memory_format = MEMORY_FORMATS[cfg.memory_format]
    model.compile_backbone = compile_backbone(
        cfg.compile, accelerator(cfg), cfg.trainer.max_epochs * data.train_batches()
    )
    return model


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


def build_trainer(
    cfg: DictConfig, plan: HeadPlan, precision: str, logger: Any, monitor: str = "val/acc"
) -> tuple[L.Trainer, EpochTimer, RunCheckpoint]:
    """The Trainer with this project's callbacks: epoch timing, the run's checkpoints (best by
    `monitor`, and last), lr monitoring with a logger, early stopping when asked."""
    timer = EpochTimer()
    checkpoint = RunCheckpoint(
        dirpath=Path(cfg.output_dir) / "checkpoints",
        filename="best",
        monitor=monitor,
        mode="max",
        save_last=True,
        last_every_s=cfg.last_ckpt_every_s,
    )
    callbacks = [timer, checkpoint] + ([LearningRateMonitor("epoch")] if logger else [])
    if cfg.early_stopping is not None:
        callbacks.append(EarlyStopping("val/loss", patience=cfg.early_stopping, mode="min"))
    trainer = instantiate(
        cfg.trainer,
        precision=precision,
        logger=logger,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        **trainer_settings(cfg),
        **plan.epochs,
    )
    return trainer, timer, checkpoint


def train(cfg: DictConfig) -> float:
    """Test, train, test again; log and checkpoint under `cfg.output_dir`; return the objective
    (with `lr_find`, the suggested learning rate)."""
    result = train_run(cfg)
    if cfg.lr_find:
        return float(result["lr_suggestion"])
    return float(result[result_objective(cfg.objective, result)])


def train_run(cfg: DictConfig) -> dict[str, Any]:
    """`train`, returning the run's whole result (what rank 0 writes to result.json): every
    rank has it, also under torchrun or srun, where only rank 0 writes the file."""
    start = time.perf_counter()
    check_config(cfg)
    quiet_lightning()
    drop_failing_nvml_check()
    L.seed_everything(cfg.seed, workers=True)
    data = instantiate(cfg.data)
    check_resume(cfg.ckpt_path, cfg, data.classes)
    warn_if_leaks(data, cfg.data.get("scan_cache"))
    multilabel = ml.is_multilabel(data)
    score = "val/mAP" if multilabel else "val/acc"  # what chooses the checkpoint
    if multilabel:
        ml.check_run(cfg, data)
    elif cfg.class_weights is None and cfg.sampler == "shuffle":
        warn_if_imbalanced(data.train_split, data.classes)
    model = build_model(cfg, data)
    print(parameter_summary(model))
    precision = resolve_precision(cfg.precision, accelerator(cfg))
    plan = HeadPlan.of(cfg, data)
    logger = instantiate(cfg.logger) if cfg.logger else False
    trainer, timer, checkpoint = build_trainer(cfg, plan, precision, logger, score)
    features = plan.prepare(model, data, trainer, cfg, "bf16" in precision)
    if cfg.lr_find:
        from src.run.lr_find import find_lr  # matplotlib's pyplot: only for the finder's plot

        return {"lr_suggestion": find_lr(trainer, model, data, Path(cfg.output_dir))}
    before = trainer.test(model, data, verbose=False)[0]
    probe = plan.fit_before_training(model, data, features, cfg, logger, trainer)
    trainer.fit(model, data, ckpt_path=cfg.ckpt_path)
    if multilabel:
        ml.fit_thresholds(trainer, model, data, checkpoint.best_model_path)
    after = trainer.test(model, data, ckpt_path="best", verbose=False)[0]
    trust = calibrate_and_store(
        cfg, trainer, model, data, features, checkpoint, probe, "bf16" in precision
    )
    best = read_checkpoint(checkpoint.best_model_path, mmap=True)
    n_test = tested_images(trainer, data)
    result = {
        **hyperparameters(cfg),
        "head_fit": plan.fit,
        "probe_l2": probe["l2"] if probe else None,
        **before,
        **after,
        **test_intervals(before | after, n_test),
        **trust,
        "n_test": n_test,
        "split": model.record["split"],
        "trainable_params": sum(p.numel() for p in trainable_parameters(model)),
        "total_params": sum(p.numel() for p in model.parameters()),
        # a probe refitted on train+val has seen val: its val score is the one that chose it
        score: float(best["callbacks"][checkpoint.state_key]["best_model_score"])
        if plan.fit != "probe" or cfg.probe.refit == "train"
        else probe[score.replace("/", "_")],
        **(ml.multilabel_result(model, data, cfg.seed) if multilabel else {}),
        "best_epoch": int(best["epoch"]),
        **timer.figures(trainer),
        "wall_s": time.perf_counter() - start,
    }
    if isinstance(logger, TensorBoardLogger):  # the HPARAMS tab, with the final metrics
        logger.log_hyperparams(hyperparameters(cfg), after | before)
    elif logger:
        logger.log_hyperparams(hyperparameters(cfg))
    if trainer.is_global_zero:  # one result under torchrun or srun, where every rank runs this
        report(cfg, result)
        if isinstance(logger, TensorBoardLogger) and not multilabel:  # confusion matrix, Grad-CAM
            from src.report.figures import log_final_figures  # matplotlib, Grad-CAM: only when used

            log_final_figures(trainer, checkpoint.best_model_path, data, precision)
    return result


def report(cfg: DictConfig, result: dict[str, Any]) -> None:
    """Write result.json in the run dir and print the RESULT line."""
    (Path(cfg.output_dir) / "result.json").write_text(json.dumps(result, indent=2))
    finetune = f" finetune={cfg.finetune.name}" if cfg.finetune.name != "none" else ""
    prefix = (
        f"RESULT backbone={cfg.backbone.name} freeze={result['freeze']}{finetune} "
        f"head_fit={result['head_fit']}"
    )
    if "test/mAP" in result:
        print(ml.result_line(prefix, result))
        return
    low, high = result["test/acc_ci95"]
    print(
        f"{prefix} before_test_acc={result['before/test_acc']:.4f} "
        f"test_acc={result['test/acc']:.4f} test_acc_ci95=[{low:.4f},{high:.4f}] "
        f"test_loss={result['test/loss']:.4f}"
    )


CV_METRICS = ["val/acc", "test/acc", "test/balanced_acc", "val/mAP", "test/mAP", "test/micro_f1",
              "test/macro_f1", "test/loss"]  # fmt: skip


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
        rows.append(train_run(fold_cfg))
    objective = result_objective(cfg.objective, rows[0])
    metrics = [m for m in dict.fromkeys([objective, *CV_METRICS]) if m in rows[0]]
    if rank_zero_only.rank == 0:
        print(write_cv(out, rows, metrics))
    means = {m: sum(row[m] for row in rows) / len(rows) for m in metrics}
    result = (
        hyperparameters(cfg)
        | means
        | {"folds": cfg.folds, "wall_s": sum(r["wall_s"] for r in rows)}
    )
    if rank_zero_only.rank == 0:  # under torchrun or srun every rank runs this
        (out / "result.json").write_text(json.dumps(result, indent=2))  # the job's row in a sweep
    return means[objective]


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
