"""Train a new head (frozen backbone) or the whole network: `python -m src.train key=value`."""

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from src.callbacks import EpochTimer
from src.errors import exit_on_user_error
from src.features import cached_features
from src.model import TransferModel, parameter_summary
from src.runtime import keep_freed_memory, resolve_precision
from src.summary import record_failure

log = logging.getLogger(__name__)
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")  # absolute: see `__main__` below


def use_cached_features(cfg: DictConfig, data: Any) -> bool:
    """Whether to train the head on precomputed features (frozen backbone, no augmentation)."""
    if cfg.cache_features == "auto":
        return bool(cfg.freeze) and data.train_transform is None
    return bool(cfg.cache_features)


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
        "freeze": bool(cfg.freeze),
        "optimizer": cfg.optimizer._target_.rsplit(".", 1)[-1],
        "lr": cfg.optimizer.lr,
        "batch_size": cfg.batch_size,
        "image_size": cfg.image_size,
        "max_epochs": cfg.trainer.max_epochs,
        "seed": cfg.seed,
    }


def train(cfg: DictConfig) -> float:
    """Test, train, test again; log and checkpoint under `cfg.output_dir`; return the objective."""
    start = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.output_dir)
    data = instantiate(cfg.data)
    model = TransferModel(
        backbone=OmegaConf.to_container(cfg.backbone, resolve=True),
        classes=data.classes,
        image_size=cfg.image_size,
        freeze=cfg.freeze,
        optimizer=instantiate(cfg.optimizer),
    )
    print(parameter_summary(model))
    precision = resolve_precision(cfg.precision, accelerator(cfg))
    timer = EpochTimer()
    checkpoint = ModelCheckpoint(
        dirpath=out / "checkpoints", filename="best", monitor="val/acc", mode="max", save_last=True
    )
    logger = instantiate(cfg.logger) if cfg.logger else False
    callbacks = [timer, checkpoint] + ([LearningRateMonitor("epoch")] if logger else [])
    trainer: L.Trainer = instantiate(
        cfg.trainer, precision=precision, logger=logger, callbacks=callbacks
    )
    if use_cached_features(cfg, data):
        device = trainer.strategy.root_device
        data.use_features(
            cached_features(
                model, data, model.hparams.backbone, cfg.cache_dir, device, "bf16" in precision
            )
        )
    model.test_phase = "before"
    before = trainer.test(model, data, verbose=False)[0]
    model.test_phase = "test"
    trainer.fit(model, data, ckpt_path=cfg.ckpt_path)
    after = trainer.test(model, data, ckpt_path="best", verbose=False)[0]
    best = torch.load(checkpoint.best_model_path, weights_only=False)  # ddp_spawn returns path only
    result = {
        **hyperparameters(cfg),
        **before,
        **after,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
        "val/acc": float(best["callbacks"][checkpoint.state_key]["best_model_score"]),
        "best_epoch": int(best["epoch"]),
        "first_epoch_s": timer.seconds[0] if timer.seconds else None,
        "mean_epoch_s": sum(timer.seconds) / len(timer.seconds) if timer.seconds else None,
        "wall_s": time.perf_counter() - start,
    }
    if logger:
        logger.log_hyperparams(hyperparameters(cfg), {k: after[k] for k in after} | before)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(
        f"RESULT backbone={cfg.backbone.name} freeze={bool(cfg.freeze)} "
        f"before_test_acc={before['before/test_acc']:.4f} test_acc={after['test/acc']:.4f} "
        f"test_loss={after['test/loss']:.4f}"
    )
    return float(result[cfg.objective])


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
@exit_on_user_error
@record_failure
def main(cfg: DictConfig) -> float:
    """Command-line entry: Hydra composes `cfg` from conf/ and the overrides."""
    keep_freed_memory()
    return train(cfg)


if __name__ == "__main__":
    # Run the importable src.train's main, not this __main__ copy's: a launcher that pickles the
    # job (joblib) then refers to src.train's functions by name, where pickling them by value
    # fails (cloudpickle collects `torch.classes`, which it cannot pickle). Hydra finds the
    # configs of a function from an imported module by package, hence the absolute CONF_DIR.
    import src.train

    src.train.main()
