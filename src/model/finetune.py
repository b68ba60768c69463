"""Fine-tuning strategies: when the backbone learns, at what learning rate, and its BatchNorm.

Every strategy creates both param groups (head, backbone) when the optimizer is built, so that
schedulers, checkpoints and resumed runs always see the same groups. While a staged backbone
waits, its parameters sit in their group with `requires_grad=False`: they get no gradient, and
PyTorch optimizers skip parameters without one, so they are neither updated nor decayed. (Adding
a param group when the backbone unfreezes, as Lightning's BaseFinetuning does, breaks resuming
from a later checkpoint and any scheduler built before the group existed.)
"""

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from src.run.errors import UserError

NAMES = ("none", "full", "staged", "lpft")
BN_CHOICES = ("frozen", "train")


@dataclass(frozen=True)
class Finetune:
    """The `finetune` config group.

    - `none`: the top-level `freeze` decides (true: head only; false: everything, one lr).
    - `full`: everything trains from the start, the backbone at `backbone_lr_scale` x the lr.
    - `staged`: the head trains alone for `unfreeze_at_epoch` epochs, then the backbone joins at
      `backbone_lr_scale` x the lr, ramped up linearly from 0 over `warmup_epochs`.
    - `lpft`: as `full`, from a head first fitted as a linear probe (src.train does that).

    `bn` (full and staged): `frozen` keeps the backbone's BatchNorm layers in eval mode, so they
    normalise with their pretrained running statistics and never update them (their affine weights
    still learn); `train` lets the statistics adapt to the new data from the batches.
    """

    name: str = "none"
    backbone_lr_scale: float = 1.0
    unfreeze_at_epoch: int = 0
    warmup_epochs: float = 0.0
    bn: str = "frozen"

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise UserError(f"unknown finetune {self.name!r}. Fix: finetune={'|'.join(NAMES)}")
        if self.bn not in BN_CHOICES:
            raise UserError(f"unknown finetune.bn={self.bn!r}. Fix: finetune.bn=frozen|train")
        if self.backbone_lr_scale <= 0:
            raise UserError(
                f"finetune.backbone_lr_scale={self.backbone_lr_scale} must be > 0. "
                "Fix: a positive scale (0.1 is usual), or freeze=true finetune=none"
            )
        if self.unfreeze_at_epoch < 0 or self.warmup_epochs < 0:
            raise UserError(
                "finetune.unfreeze_at_epoch and finetune.warmup_epochs must be >= 0. "
                "Fix: give epochs counted from 0"
            )

    def frozen_at_start(self, freeze: bool) -> bool:
        """Whether the backbone starts frozen, given the top-level `freeze`."""
        if self.name == "none":
            return freeze
        return self.name == "staged" and self.unfreeze_at_epoch > 0

    def frozen_throughout(self, freeze: bool) -> bool:
        """Whether the backbone never learns in this run (so its features can be cached)."""
        return self.name == "none" and freeze

    def unfreezes_at(self, epoch: int) -> bool:
        """Whether a backbone still frozen at the start of `epoch` should start learning."""
        return self.name == "staged" and epoch >= self.unfreeze_at_epoch

    @property
    def split_groups(self) -> bool:
        """Whether the optimizer gets separate head and backbone param groups."""
        return self.name != "none"

    @property
    def freeze_bn(self) -> bool:
        """Whether a learning backbone keeps its BatchNorm layers in eval mode."""
        return self.name != "none" and self.bn == "frozen"

    def backbone_lr_factor(self, epoch: int, batch_idx: int, batches_per_epoch: float) -> float:
        """The warm-up factor on the backbone's lr for the optimizer step of this batch."""
        if self.name != "staged" or self.warmup_epochs == 0:
            return 1.0
        done = epoch - self.unfreeze_at_epoch + (batch_idx + 1) / batches_per_epoch
        return min(1.0, max(0.0, done / self.warmup_epochs))

    def check_epochs(self, max_epochs: int | None) -> None:
        """Refuse a staged run that would end before its backbone unfreezes."""
        if self.name != "staged" or max_epochs is None or max_epochs < 0:
            return
        if self.unfreeze_at_epoch >= max_epochs:
            raise UserError(
                f"finetune.unfreeze_at_epoch={self.unfreeze_at_epoch} >= "
                f"trainer.max_epochs={max_epochs}: the backbone would never learn. "
                "Fix: a smaller finetune.unfreeze_at_epoch or more trainer.max_epochs"
            )


def batchnorm_layers(module: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of `module` (timm's BatchNormAct2d included)."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


BUCKET_BYTES = 25 * 2**20  # gradients all-reduced per collective call (DDP's default bucket)


def reduce_gradients(parameters: Iterable[nn.Parameter], world: int) -> int:
    """Average the gradients of `parameters` over the `world` DDP ranks, in flattened buckets
    of BUCKET_BYTES per dtype (one collective call per bucket instead of one per tensor: a
    ResNet-50 has 161). Returns the number of calls."""
    buckets: dict[torch.dtype, list[list[torch.Tensor]]] = {}
    filled: dict[torch.dtype, int] = {}
    for grad in (p.grad for p in parameters if p.grad is not None):
        groups = buckets.setdefault(grad.dtype, [[]])
        if filled.get(grad.dtype, 0) >= BUCKET_BYTES:
            groups.append([])
            filled[grad.dtype] = 0
        groups[-1].append(grad)
        filled[grad.dtype] = filled.get(grad.dtype, 0) + grad.numel() * grad.element_size()
    calls = 0
    for group in (g for groups in buckets.values() for g in groups if g):
        flat = _flatten_dense_tensors(group)
        torch.distributed.all_reduce(flat)
        flat /= world
        for grad, reduced in zip(group, _unflatten_dense_tensors(flat, group), strict=True):
            grad.copy_(reduced)
        calls += 1
    return calls
