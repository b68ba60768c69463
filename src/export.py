"""Export a checkpoint for serving: `python -m src.export ckpt_path=... format=onnx|torchscript`.

Writes `model.onnx` or `model.pt` with `model.json` beside it (the preprocessing contract) and
checks the exported model's logits against the checkpoint's on a sample batch.
"""

import json
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from src.model.inference import label_thresholds, load_checkpoint
from src.model.network import TransferNet
from src.run.errors import UserError, exit_on_user_error

SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}
PREPROCESSING = {  # how the checkpoint's data.resize makes an image square (fit_square)
    "squash": "resize the whole image to {size}x{size} (bilinear, no crop)",
    "pad": "resize the long side to {size} (bilinear, aspect ratio kept), centre it on a "
    "{size}x{size} square filled with the image's mean colour (rounded)",
    "crop": "resize the short side to {size} (bilinear, antialiased), then crop the centre "
    "{size}x{size}",
}


def contract(model: TransferNet, fmt: str, file: str) -> dict[str, Any]:
    """What a caller must feed the exported model and what it returns."""
    size = model.image_size
    return {
        "format": fmt,
        "file": file,
        "backbone": model.backbone_config["name"],
        "input": {
            "name": "images",
            "shape": ["batch", 3, size, size],
            "dtype": "uint8",
            "channels": "RGB",
            "layout": "NCHW",
            "resize": model.resize,
            "preprocessing": PREPROCESSING[model.resize].format(size=size),
        },
        "normalisation": {
            "applied": "inside the model: (images / 255 - mean) / std",
            "mean": [round(float(v) / 255, 6) for v in model.mean.flatten()],
            "std": [round(float(v) / 255, 6) for v in model.std.flatten()],
        },
        "output": {
            "name": "logits",
            "shape": ["batch", len(model.classes)],
            "meaning": "class logits (uncalibrated); softmax(logits / temperature) gives the "
            "calibrated probabilities src.predict shows",
        },
        "classes": list(model.classes),
        **trust_contract(model),
    } | (multilabel_output(model) if getattr(model, "task", "") == "multilabel" else {})


def multilabel_output(model: TransferNet) -> dict[str, Any]:
    """A multi-label model's outputs: one independent sigmoid per label, and each label's
    threshold (chosen on val) above which it is predicted."""
    thresholds = label_thresholds(model)
    return {
        "task": "multilabel",
        "output": {
            "name": "logits",
            "shape": ["batch", len(model.classes)],
            "meaning": "per-label logits; sigmoid gives each label's probability, and a label "
            "is predicted where its probability >= its threshold",
        },
        "thresholds": dict(zip(model.classes, thresholds, strict=True)),
    }


def trust_contract(model: TransferNet) -> dict[str, Any]:
    """The temperature, and where the `unknown` check lives: in src.predict only, since the
    k-NN score needs the training features (megabytes) beside every copy of the model."""
    trust = model.record.get("trust")
    temperature = float(trust["temperature"]) if trust else 1.0
    ood = trust.get("ood") if trust else None
    unknown = (
        {
            "in_model": False,
            "where": "src.predict only (python -m src.predict ckpt_path=<the checkpoint>)",
            "score": ood["score"],
            "k": ood["k"],
            "threshold": ood["threshold"],
            "coverage": ood["coverage"],
            "why": "the exported graph stays the tested one (logits); the k-NN score needs the "
            "checkpoint's training features, which a serving stack keeps in its own index",
        }
        if ood
        else {"in_model": False, "where": "none: the checkpoint stores no OOD data"}
    )
    return {"temperature": temperature, "calibrated": trust is not None, "unknown": unknown}


@contextmanager
def traceable() -> Iterator[None]:
    """Attention as plain operators: a frozen model's nn.MultiheadAttention (torchvision's ViT)
    would otherwise take the fused fast path, which neither exporter can trace."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def export_onnx(model: TransferNet, sample: torch.Tensor, path: Path) -> None:
    """ONNX with a dynamic batch size (the TorchScript-based exporter: no onnxscript needed)."""
    with traceable():
        torch.onnx.export(
            model,
            (sample,),
            str(path),
            dynamo=False,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        )


def run_onnx(path: Path, images: torch.Tensor) -> torch.Tensor:
    """Logits of the ONNX model on the CPU with ONNX Runtime."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export, write the contract, check parity; return the contract (with the parity result)."""
    if cfg.format not in SUFFIXES:
        raise UserError(f"unknown format {cfg.format!r}. Fix: format=onnx or format=torchscript")
    model = load_checkpoint(cfg.ckpt_path).cpu().eval()
    size = model.image_size
    generator = torch.Generator().manual_seed(0)
    sample = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, generator=generator)
    check = torch.randint(
        0, 256, (cfg.check_batch, 3, size, size), dtype=torch.uint8, generator=generator
    )
    out = Path(cfg.output_dir)
    path = out / f"model{SUFFIXES[cfg.format]}"
    with warnings.catch_warnings():  # both exporters are TorchScript-based, deprecated upstream
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
        if cfg.format == "onnx":
            export_onnx(model, sample, path)
            exported = run_onnx(path, check)
        else:
            with traceable():
                torch.jit.save(torch.jit.trace(model, sample), path)
            with torch.inference_mode():
                exported = torch.jit.load(path)(check)
    with torch.inference_mode():
        expected = model(check)
    diff = float((exported - expected).abs().max())
    allowed = cfg.tolerance * max(1.0, float(expected.abs().max()))
    info = contract(model, cfg.format, path.name) | {
        "checkpoint": str(cfg.ckpt_path),
        "parity": {
            "max_abs_diff": diff,
            "tolerance": cfg.tolerance,
            "allowed": allowed,
            "batch": cfg.check_batch,
        },
    }
    (out / "model.json").write_text(json.dumps(info, indent=2))
    verdict = "ok" if math.isfinite(diff) and diff <= allowed else "FAILED"
    print(
        f"{cfg.format} parity on {cfg.check_batch} images: max abs diff {diff:.3g} "
        f"(allowed {allowed:.3g}): {verdict}"
    )
    if verdict != "ok":
        raise UserError(
            f"the exported {path} differs from the checkpoint by {diff:.3g} > {allowed:.3g}: "
            "do not ship it. Fix: try the other format, or report the backbone and versions"
        )
    print(f"exported {path} with its contract {out / 'model.json'}")
    return info


@exit_on_user_error
@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Command-line entry: Hydra composes `cfg` from conf/export.yaml and the overrides."""
    export(cfg)


if __name__ == "__main__":
    main()
