"""Matplotlib figures of what a model learned: confusion matrix, image grids, Grad-CAM overlays;
and a training run's final figures in TensorBoard."""

import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from torchmetrics.functional.classification import multiclass_confusion_matrix

from src.data.images import decode_all
from src.data.module import ImageFolderData
from src.frozen.batches import minibatches
from src.model.inference import chunks, gradcam, logits, target_layer
from src.model.network import TransferNet, load_model

GRADCAM_IMAGES = 6  # the training run's heatmaps: the first test image of each class, at most


def confusion_matrix_figure(matrix: torch.Tensor, classes: list[str]) -> Figure:
    """Counts of true (rows) against predicted (columns) classes, shaded by row share."""
    counts = matrix.numpy()
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    side = max(4.0, 0.7 * len(classes) + 2.5)
    fig = Figure(figsize=(side + 1, side), layout="constrained")
    ax = fig.add_subplot()
    shading = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(shading, ax=ax, label="share of the true class", shrink=0.8)
    for (row, col), count in np.ndenumerate(counts):
        colour = "white" if share[row, col] > 0.6 else "black"
        ax.text(col, row, str(count), ha="center", va="center", color=colour, fontsize=11)
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=30, ha="right")
    ax.set_yticks(ticks, classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix ({int(counts.sum())} test images)")
    return fig


def image_grid_figure(images: torch.Tensor, titles: list[str], title: str, cols: int = 4) -> Figure:
    """uint8 images (N, 3, H, W) in a grid, each with its title; a note when there are none."""
    if len(images) == 0:
        fig = Figure(figsize=(4, 1.5), layout="constrained")
        fig.text(0.5, 0.5, f"{title}: none", ha="center", va="center", fontsize=12)
        return fig
    cols = min(cols, len(images))
    rows = math.ceil(len(images) / cols)
    fig = Figure(figsize=(2.6 * cols, 2.9 * rows), layout="constrained")
    fig.suptitle(title)
    for i, (image, text) in enumerate(zip(images, titles, strict=True)):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(image.permute(1, 2, 0).numpy())
        ax.set_title(text, fontsize=10)
        ax.axis("off")
    return fig


def overlay(image: torch.Tensor, heatmap: np.ndarray) -> np.ndarray:
    """A uint8 image (3, H, W) blended with its [0, 1] heatmap (H, W) in the jet colour map."""
    from pytorch_grad_cam.utils.image import show_cam_on_image  # OpenCV: only for heatmaps

    rgb = image.permute(1, 2, 0).numpy().astype(np.float32) / 255
    return show_cam_on_image(rgb, heatmap, use_rgb=True)


def gradcam_figure(
    images: torch.Tensor, heatmaps: np.ndarray, left: list[str], right: list[str]
) -> Figure:
    """One row per image: the image (titled `left`) beside its Grad-CAM overlay (`right`)."""
    fig = Figure(figsize=(6, 3.1 * len(images)), layout="constrained")
    for i, image in enumerate(images):
        for j, (picture, text) in enumerate(
            ((image.permute(1, 2, 0).numpy(), left[i]), (overlay(image, heatmaps[i]), right[i]))
        ):
            ax = fig.add_subplot(len(images), 2, 2 * i + j + 1)
            ax.imshow(picture)
            ax.set_title(text, fontsize=11)
            ax.axis("off")
    return fig


def tested_model(best_path: str | Path, precision: str, device: torch.device) -> TransferNet:
    """The network of the checkpoint the final test used, on `device`, in the weights' dtype of
    a "-true" precision: not the module in memory, which after `fit` holds the last epoch's
    weights (under ddp_spawn), sits on the CPU (Lightning's teardown) and may be compiled (hooks
    added to a compiled module may see no activations). Built eager from the file."""
    model = load_model(best_path).to(device)
    dtype = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}
    return model.to(dtype.get(precision, torch.float32))


def log_final_figures(
    trainer: L.Trainer, best_path: str | Path, data: ImageFolderData, precision: str
) -> None:
    """Log the final test's confusion matrix and Grad-CAM heatmaps of a few fixed test images.

    Only with a TensorBoard logger. Predictions are the tested checkpoint's (`tested_model`) on
    the run's device, with the test's inputs (cached features or images) and precision, so the
    matrix matches the logged `test/acc` (over the whole test set: the Trainer's
    `limit_test_batches` does not apply here).
    """
    logger = trainer.logger
    if not isinstance(logger, TensorBoardLogger):
        return
    device = trainer.strategy.root_device
    model = tested_model(best_path, precision, device)
    bf16 = precision == "bf16-mixed"
    classes = list(model.classes)
    batches = [b for batch in data.test_dataloader() for b in minibatches(batch)]
    scores = logits(model, (x for x, _ in batches), device, bf16)
    labels = torch.cat([y for _, y in batches])
    matrix = multiclass_confusion_matrix(scores.argmax(1), labels, len(classes))
    step = trainer.global_step
    logger.experiment.add_figure(
        "test/confusion_matrix", confusion_matrix_figure(matrix, classes), step
    )
    split = data.test_split
    picks = [split.labels.index(c) for c in sorted(set(split.labels))][:GRADCAM_IMAGES]
    images = decode_all([split.paths[i] for i in picks], data.image_size, data.resize)
    probs = logits(model, [images], device, bf16).softmax(1)
    predicted = probs.argmax(1).tolist()
    heatmaps = gradcam(model.float(), chunks(images, 16), predicted, target_layer(model), device)
    left = [f"true: {classes[split.labels[i]]}" for i in picks]
    right = [f"Grad-CAM: {classes[p]} ({probs[k, p]:.2f})" for k, p in enumerate(predicted)]
    logger.experiment.add_figure(
        "test/gradcam", gradcam_figure(images, heatmaps, left, right), step
    )
    logger.experiment.flush()
