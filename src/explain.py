"""Grad-CAM heatmaps of where a model looks: `python -m src.explain ckpt_path=... inputs=...`."""

from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from src.data.images import stream_images
from src.data.scan import list_inputs
from src.model.inference import (
    gradcam,
    label_thresholds,
    load_checkpoint,
    logits,
    pick_device,
    target_layer,
)
from src.run.errors import UserError, exit_on_user_error

BATCH = 16  # images per Grad-CAM pass


def explain(cfg: DictConfig) -> list[Path]:
    """Write one PNG per input: the image beside its Grad-CAM overlay (a multi-label model: one
    row per label it predicts); return their paths.

    Inputs (an image, or a folder searched recursively) are decoded in streaming batches; an
    unreadable file is reported and skipped.
    """
    from src.report.figures import gradcam_figure

    paths = list_inputs(cfg.inputs)
    model = load_checkpoint(cfg.ckpt_path)
    classes = list(model.classes)
    if cfg.target is not None and cfg.target not in classes:
        raise UserError(f"unknown target class {cfg.target!r}. Fix: target=one of {classes}")
    device = pick_device(cfg.device)
    layer = target_layer(model, cfg.target_layer)
    out = Path(cfg.output_dir)
    stems = [p.stem for p in paths]
    written = []
    for indices, images, errors in stream_images(
        paths, model.image_size, BATCH, resize=model.resize
    ):
        for i, why in errors.items():
            print(f"{paths[i]}: cannot be read ({why}): skipped")
        if not indices:
            continue
        probs, predicted = predictions(model, logits(model, [images], device))
        targets = predicted if cfg.target is None else [[classes.index(cfg.target)]] * len(images)
        rows = [(k, t) for k, labels in enumerate(targets) for t in labels]
        heatmaps = gradcam(
            model, [images[[k for k, _ in rows]]], [t for _, t in rows], layer, device
        )
        for k, i in enumerate(indices):
            path = paths[i]
            name = path.stem if stems.count(path.stem) == 1 else path.name.replace(".", "_")
            mine = [r for r, (image, _) in enumerate(rows) if image == k]
            shown = ", ".join(f"{classes[p]} ({probs[k, p]:.2f})" for p in predicted[k])
            many = f"{len(predicted[k])} labels predicted"
            left = [f"{path.name}\n{f'predicted: {shown}' if len(mine) == 1 else many}"] * len(mine)
            right = [f"Grad-CAM for {classes[rows[r][1]]}\n(p = {probs[k, rows[r][1]]:.2f})"
                     for r in mine]  # fmt: skip
            figure = gradcam_figure(images[[k] * len(mine)], heatmaps[mine], left, right)
            written.append(out / f"{name}_gradcam.png")
            figure.savefig(written[-1], dpi=100)
            labels = ", ".join(classes[rows[r][1]] for r in mine)
            print(f"{path}: {shown} -> Grad-CAM of {labels} in {written[-1]}")
    return written


def predictions(model: Any, scores: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
    """Probabilities and each image's predicted classes: the most likely one, or for a
    multi-label model every label at or above its threshold (the most likely where none is)."""
    if getattr(model, "task", "multiclass") != "multilabel":
        probs = scores.softmax(1)
        return probs, [[c] for c in probs.argmax(1).tolist()]
    probs = scores.sigmoid()
    cut = torch.tensor(label_thresholds(model))
    above = probs >= cut
    return probs, [
        row.nonzero().flatten().tolist() or [int(p.argmax())]
        for row, p in zip(above, probs, strict=True)
    ]


@exit_on_user_error
@hydra.main(config_path="../conf", config_name="explain", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Command-line entry: Hydra composes `cfg` from conf/explain.yaml and the overrides."""
    explain(cfg)


if __name__ == "__main__":
    main()
