"""Grad-CAM heatmaps of where a model looks: `python -m src.explain ckpt_path=... inputs=...`."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from src.data.images import stream_images
from src.data.scan import list_inputs
from src.model.inference import gradcam, load_checkpoint, logits, pick_device, target_layer
from src.run.errors import UserError, exit_on_user_error

BATCH = 16  # images per Grad-CAM pass


def explain(cfg: DictConfig) -> list[Path]:
    """Write one PNG per input: the image beside its Grad-CAM overlay; return their paths.

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
        probs = logits(model, [images], device).softmax(1)
        predicted = probs.argmax(1).tolist()
        targets = predicted if cfg.target is None else [classes.index(cfg.target)] * len(images)
        heatmaps = gradcam(model, [images], targets, layer, device)
        for k, i in enumerate(indices):
            path = paths[i]
            name = path.stem if stems.count(path.stem) == 1 else path.name.replace(".", "_")
            p, t = predicted[k], targets[k]
            left = f"{path.name}\npredicted: {classes[p]} ({probs[k, p]:.2f})"
            right = f"Grad-CAM for {classes[t]}\n(p = {probs[k, t]:.2f})"
            figure = gradcam_figure(images[k : k + 1], heatmaps[k : k + 1], [left], [right])
            written.append(out / f"{name}_gradcam.png")
            figure.savefig(written[-1], dpi=100)
            print(f"{path}: {classes[p]} -> Grad-CAM of {classes[t]} in {written[-1]}")
    return written


@exit_on_user_error
@hydra.main(config_path="../conf", config_name="explain", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Command-line entry: Hydra composes `cfg` from conf/explain.yaml and the overrides."""
    explain(cfg)


if __name__ == "__main__":
    main()
