"""The LightningModule: the network (src.network) with its training, losses and metrics."""

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from src.model.finetune import Finetune, batchnorm_layers, reduce_gradients
from src.model.metrics import DEFAULT_THRESHOLD, LabelScores, multilabel_metrics, stage_metrics
from src.model.network import TransferNet
from src.run.checkpoints import RECORD, VERSION


def freeze(module: nn.Module) -> None:
    """Stop `module` learning: no gradients, BatchNorm and Dropout in eval mode."""
    module.requires_grad_(False)
    module.eval()


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of `module` that receive gradients."""
    return [p for p in module.parameters() if p.requires_grad]


def parameter_summary(module: nn.Module) -> str:
    """Keras-style parameter counts, three lines with thousands separators."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in trainable_parameters(module))
    return (
        f"Total params: {total:,}\nTrainable params: {trainable:,}\n"
        f"Non-trainable params: {total - trainable:,}"
    )


class TransferModel(TransferNet, L.LightningModule):
    """TransferNet trained by Lightning; its hparams (classes, image_size, backbone and the
    training settings) make a checkpoint self-contained.

    `finetune` (Finetune's fields) chooses when the backbone learns and at which lr;
    `scheduler` is the `scheduler` config group instantiated: `build` (a partial taking the
    optimizer, and `total_steps` when `interval` is `step`), `interval` and `monitor`.
    `task` multilabel: one sigmoid output per label, BCEWithLogitsLoss (`class_weights`: the
    per-label pos_weight), val/test mAP and per-label thresholds (`set_thresholds`).
    `label_smoothing` and `class_weights` (one per class, e.g. inverse class frequency) apply to
    the training loss only, so val and test losses stay comparable. `record` (the run's settings
    and split, src.run.checkpoints) is saved in every checkpoint.

    A test of weights that no fit has touched (neither run here nor loaded from a checkpoint)
    logs its metrics as `before/test_*`, any other test as `test/*`.
    """

    def __init__(
        self,
        backbone: dict[str, Any],
        classes: list[str],
        image_size: int = 160,
        freeze: bool = True,
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
        finetune: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        scheduler: dict[str, Any] | None = None,
        class_weights: list[float] | None = None,
        record: dict[str, Any] | None = None,
        resize: str = "squash",
        task: str = "multiclass",
    ) -> None:
        super().__init__(backbone, classes, image_size, resize)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "record"], logger=False)
        self.record = record or {}
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.label_smoothing = label_smoothing
        weights = torch.tensor(class_weights) if class_weights else None
        self.register_buffer("class_weights", weights, persistent=False)
        self.finetune = Finetune(**(finetune or {}))
        self.backbone_frozen = False
        self.reduce_backbone_gradients = False
        if self.finetune.frozen_at_start(freeze):
            self.freeze_backbone()
        self.task = task
        self.metrics = stage_metrics(task, len(classes))
        # multi-label: the test epoch's scores, for the metrics at the thresholds
        self.test_scores = LabelScores() if task == "multilabel" else None
        # and those of the last test run in this process (not under ddp_spawn: its ranks')
        self.last_test_scores: tuple[torch.Tensor, torch.Tensor] | None = None
        self.thresholds = torch.full((len(classes),), DEFAULT_THRESHOLD, dtype=torch.float64)
        self.trained = False  # weights from a fit (run here or loaded): see `test_step`
        self.fitted_head = False  # the head was fitted before training (`keep_fitted_head`)
        self.steps_per_batch = 1  # optimizer steps per training batch (see train_on_chunks)
        self.compile_backbone = False  # torch.compile the backbone in `configure_model`

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[RECORD] = {"version": VERSION, **self.record}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Weights loaded from a checkpoint (a resume, or `test(ckpt_path=...)` in any process,
        a ddp_spawn rank's too) are trained ones; a multi-label one brings its thresholds."""
        self.trained = True
        if (thresholds := checkpoint.get(RECORD, {}).get("thresholds")) is not None:
            self.set_thresholds(torch.tensor(thresholds, dtype=torch.float64))

    def set_thresholds(self, thresholds: torch.Tensor) -> None:
        """The per-label cuts of a multi-label model (chosen on val), saved in its checkpoints."""
        self.thresholds = thresholds
        self.record["thresholds"] = thresholds.tolist()

    def freeze_backbone(self) -> None:
        """Freeze the backbone (for the run, or until a staged fine-tune unfreezes it)."""
        freeze(self.backbone)
        self.backbone_frozen = True

    def unfreeze_backbone(self) -> None:
        """Let the backbone learn; with `finetune.bn=frozen` its BatchNorm stays in eval mode.

        DDP all-reduces only the parameters that required gradients when it wrapped the model:
        a backbone unfrozen later has its gradients all-reduced here (`on_after_backward`), so
        every rank takes the same step and the ranks keep one model.
        """
        self.backbone.requires_grad_(True)
        self.backbone_frozen = False
        self.reduce_backbone_gradients = self._trainer is not None and self.trainer.world_size > 1
        self.train(self.training)

    def on_after_backward(self) -> None:
        if not self.reduce_backbone_gradients:
            return
        reduce_gradients(self.backbone.parameters(), self.trainer.world_size)

    def setup(self, stage: str) -> None:
        """Fresh metric states in the process that runs `stage`: ddp_spawn's CPU ranks share the
        parent's tensors, where in-place sums would mix ranks and carry one stage into the next."""
        for metric in self.modules():
            if isinstance(metric, Metric):
                metric.reset()

    def configure_model(self) -> None:
        """Compile the backbone (`compile_backbone`) in the process that trains it, at each fit or
        test: a module pickled to a ddp_spawn rank loses its compilation, and extraction (before
        this) and Grad-CAM (on the checkpoint, src.report.figures) stay eager."""
        if self.compile_backbone and self.backbone._compiled_call_impl is None:
            self.backbone.compile()

    def train(self, mode: bool = True) -> "TransferModel":
        """Keep a frozen backbone (or only its BatchNorm, `finetune.bn=frozen`) in eval mode.

        A frozen backbone is left as it is (in eval mode since it froze) rather than walked
        twice per call: Lightning switches modes at every epoch and validation."""
        if self.backbone_frozen:
            self.training = mode
            for child in self.children():
                if child is not self.backbone:
                    child.train(mode)
            if self.backbone.training:
                self.backbone.eval()
            return self
        super().train(mode)
        if self.finetune.freeze_bn:
            for layer in batchnorm_layers(self.backbone):
                layer.eval()
        return self

    def _step(
        self,
        batch: Any,
        stage: str,
        prefix: str,
        learn: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Loss and metrics of a batch's minibatches (the batch itself, or the run of one that
        offers `minibatches()`, as src.frozen.batches.FeatureChunks does), logged per epoch;
        `learn` takes each minibatch's loss (the optimizer steps of `train_on_chunks`). The
        metric objects reduce over DDP ranks (the loss as a mean weighted by images), so every
        figure covers all images once."""
        training = stage == "train"
        metrics = self.metrics[f"{stage}_metrics"]
        predictions, targets = [], []
        runs = batch.minibatches() if hasattr(batch, "minibatches") else [batch]
        for x, y in runs:
            logits = self.logits(x)
            if self.task == "multilabel":
                loss = F.binary_cross_entropy_with_logits(
                    logits.float(), y.float(), pos_weight=self.class_weights if training else None
                )
            else:
                loss = F.cross_entropy(
                    logits.float(),
                    y,
                    weight=self.class_weights if training else None,
                    label_smoothing=self.label_smoothing if training else 0.0,
                )
            metrics["loss"].update(loss.detach(), len(y))
            if learn is not None:
                learn(loss)
            predictions.append(logits.detach())
            targets.append(y)
        logits, y = (torch.cat(predictions), torch.cat(targets)) if len(targets) > 1 else (
            predictions[0], targets[0]
        )  # fmt: skip
        if stage == "test" and self.task == "multilabel":
            self.test_scores.update(logits, y)
        for name, metric in metrics.items():
            if name != "loss":
                metric.update(logits, y)
            self.log(f"{prefix}{name}", metric, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def training_step(self, batch: Any) -> torch.Tensor | None:
        """A minibatch's loss for Lightning's optimization; or, training on chunks
        (`train_on_chunks`), the steps of every minibatch of the batch, taken here."""
        if self.automatic_optimization:
            return self._step(batch, "train", "train/")
        self._step(batch, "train", "train/", self._learn)
        return None

    def _learn(self, loss: torch.Tensor) -> None:
        """One optimizer step on `loss`, and the per-step schedulers' (manual optimization).

        The torch optimizer and backward directly: Lightning's wrappers (its per-step hooks and
        profiler) cost more than a linear head's step, and `train_on_chunks` runs only where
        they add nothing (no gradient scaler, clipping or accumulation). The step is counted in
        Lightning's progress, as its optimizer wrapper would, so `global_step`, logging,
        checkpoints and resuming see every step."""
        optimizer = self.optimizers(use_pl_optimizer=False)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        steps.increment_ready()
        steps.increment_completed()
        for config in self.trainer.lr_scheduler_configs:
            if config.interval == "step":
                config.scheduler.step()

    def validation_step(self, batch: Any) -> None:
        self._step(batch, "val", "val/")

    def test_step(self, batch: Any) -> None:
        self._step(batch, "test", "test/" if self.trained else "before/test_")

    def on_test_epoch_end(self) -> None:
        """Multi-label: log the metrics at the per-label thresholds, of every test image."""
        if self.task != "multilabel":
            return
        probs, targets = self.last_test_scores = self.test_scores.gathered()
        self.test_scores.reset()
        prefix = "test/" if self.trained else "before/test_"
        for name, value in multilabel_metrics(
            probs, targets, self.thresholds.to(probs.device)
        ).items():
            if name != "mAP":  # logged by the step's metric
                self.log(f"{prefix}{name}", value)

    def keep_fitted_head(self) -> None:
        """The head was fitted before training (the linear probe): `fit` then only validates
        and checkpoints it, with an optimizer of lr 0."""
        self.fitted_head = True

    def train_on_chunks(self, steps_per_batch: int) -> None:
        """Take the optimizer steps of each training batch's minibatches (FeatureChunks, one per
        epoch) in `training_step`, with the same updates, per-step schedules and metrics as one
        Lightning step per minibatch. Lightning then steps neither the optimizer nor any
        scheduler: one stepped per epoch (a plateau's) rules this mode out (src.train)."""
        self.automatic_optimization = False
        self.steps_per_batch = steps_per_batch

    def on_fit_start(self) -> None:
        self.trained = True
        self.finetune.check_epochs(self.trainer.max_epochs)

    def on_train_epoch_start(self) -> None:
        """Unfreeze a staged backbone when its epoch comes (a resumed run too); enter training mode.

        Lightning 2.x restores the module modes saved before an evaluation instead of calling
        `.train()`, so a test run before `fit` would otherwise leave the model in eval mode.
        """
        if self.backbone_frozen and self.finetune.unfreezes_at(self.current_epoch):
            self.unfreeze_backbone()
        self.train()

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: torch.optim.Optimizer,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        """Step with the backbone's lr times its warm-up factor, then put the lr back.

        The factor never stays in the param group, so any scheduler (LambdaLR, OneCycleLR, or
        ReduceLROnPlateau, which scales the current lr) sees only its own values.
        """
        factor = self.finetune.backbone_lr_factor(
            epoch, batch_idx, self.trainer.num_training_batches
        )
        if factor == 1.0:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        group = next(g for g in optimizer.param_groups if g.get("name") == "backbone")
        lr = group["lr"]
        group["lr"] = lr * factor
        try:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        finally:
            group["lr"] = lr

    def parameter_groups(self) -> list[dict[str, Any]]:
        """What the optimizer gets: the trainable parameters, or head and backbone groups.

        With a fine-tuning strategy both groups exist from the start, a staged backbone's while
        it is still frozen, so the optimizer's groups never change during a run or on resume.
        """
        if not self.finetune.split_groups:
            return [{"params": trainable_parameters(self)}]
        backbone = list(self.backbone.parameters())
        in_backbone = {id(p) for p in backbone}
        head = [p for p in self.parameters() if id(p) not in in_backbone]
        return [{"params": head, "name": "head"}, {"params": backbone, "name": "backbone"}]

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        if self.fitted_head:  # lr 0: the epoch only validates and checkpoints the fitted head
            return torch.optim.SGD(self.head.parameters(), lr=0.0)
        if self.optimizer is None:
            raise RuntimeError("TransferModel needs an optimizer factory to train")
        optimizer = self.optimizer(self.parameter_groups())
        for group in optimizer.param_groups:
            if group.get("name") == "backbone":
                group["lr"] *= self.finetune.backbone_lr_scale
        if not self.scheduler or self.scheduler.get("build") is None:
            return optimizer
        build, interval = self.scheduler["build"], self.scheduler["interval"]
        if interval == "step":
            steps = self.trainer.estimated_stepping_batches * self.steps_per_batch
            build = partial(build, total_steps=steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": build(optimizer),
                "interval": interval,
                # manual optimization (train_on_chunks) takes no `monitor` key, not even None
                **(
                    {"monitor": self.scheduler.get("monitor")}
                    if self.automatic_optimization
                    else {}
                ),
            },
        }
