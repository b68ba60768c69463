"""Backbones by name: every torchvision classifier and every timm model. The config groups'
`_target_`s (and checkpoints' hyperparameters) name the two builders here."""

from src.backbones.describe import Backbone
from src.backbones.timm_models import timm_backbone
from src.backbones.torchvision_models import torchvision_backbone

__all__ = ["Backbone", "timm_backbone", "torchvision_backbone"]
