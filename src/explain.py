"""Grad-CAM heatmaps of where a model looks: `python -m src.explain ckpt_path=... inputs=...`."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from src.data import decode_all
from src.errors import UserError, exit_on_user_error
from src.inference import chunks, gradcam, load_checkpoint, logits, pick_device, target_layer
from src.predict import image_paths


def explain(cfg: DictConfig) -> list[Path]:
    """Write one PNG per input: the image beside its Grad-CAM overlay; return their paths."""
    from src.figures import gradcam_figure

    paths = image_paths(cfg.inputs)
    model = load_checkpoint(cfg.ckpt_path)
    classes = list(model.hparams.classes)
    if cfg.target is not None and cfg.target not in classes:
        raise UserError(f"unknown target class {cfg.target!r}. Fix: target=one of {classes}")
    images = decode_all(paths, model.hparams.image_size)
    device = pick_device(cfg.device)
    probs = logits(model, chunks(images, 64), device).softmax(1)
    predicted = probs.argmax(1).tolist()
    targets = predicted if cfg.target is None else [classes.index(cfg.target)] * len(paths)
    layer = target_layer(model, cfg.target_layer)
    heatmaps = gradcam(model, chunks(images, 16), targets, layer, device)
    out = Path(cfg.output_dir)
    stems = [p.stem for p in paths]
    written = []
    for i, path in enumerate(paths):
        name = path.stem if stems.count(path.stem) == 1 else path.name.replace(".", "_")
        left = f"{path.name}\npredicted: {classes[predicted[i]]} ({probs[i, predicted[i]]:.2f})"
        right = f"Grad-CAM for {classes[targets[i]]}\n(p = {probs[i, targets[i]]:.2f})"
        figure = gradcam_figure(images[i : i + 1], heatmaps[i : i + 1], [left], [right])
        written.append(out / f"{name}_gradcam.png")
        figure.savefig(written[-1], dpi=100)
        print(
            f"{path}: {classes[predicted[i]]} -> Grad-CAM of {classes[targets[i]]} in {written[-1]}"
        )
    return written


@exit_on_user_error
@hydra.main(config_path="../conf", config_name="explain", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Command-line entry: Hydra composes `cfg` from conf/explain.yaml and the overrides."""
    explain(cfg)


if __name__ == "__main__":
    main()
