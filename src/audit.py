"""Audit the data before trusting a model: `python -m src.audit [data=...] [backbone=...]`.

Writes label_issues.csv, duplicates.csv, outliers.csv, report.html and report.md in the run dir
(paths relative to data.root); features come from the trainer's feature cache."""

import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.frozen.cache import cached_features
from src.model.inference import pick_device
from src.model.network import TransferNet
from src.quality.findings import Findings, Images, audit_images
from src.quality.hashes import hash_cache_file
from src.quality.page import counts, write_pages
from src.run.config import check_config
from src.run.errors import UserError, exit_on_user_error
from src.run.runtime import quiet_lightning, resolve_precision

log = logging.getLogger(__name__)
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def label_layers(model: TransferNet, label_features: str) -> tuple[str, ...]:
    """The backbone layers whose pooled outputs the label-issue probes read (none: the pooled
    features), by `audit.label_features`."""
    if label_features not in ("stages", "pooled"):
        raise UserError(
            f"audit.label_features={label_features} is not a choice. Fix: "
            "audit.label_features=stages (the backbone's last stages, pooled) or pooled"
        )
    return model.spec.stage_layers if label_features == "stages" else ()


def audited_images(
    cfg: DictConfig, data: Any, device: torch.device, bf16: bool
) -> tuple[Images, tuple[str, ...]]:
    """The images of `data` with what the audit reads from the feature cache (the pooled
    features; the stage layers' for the label issues), and those layers. A wrong
    `audit.label_features` stops before any extraction."""
    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    model = TransferNet(backbone, data.classes, cfg.image_size)
    stages = label_layers(model, cfg.audit.label_features)

    def features(layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
        return cached_features(
            model, data, backbone, cfg.cache_dir, device, bf16, cfg.batch_size, layers
        )

    return Images.of(data, features(()), features(stages) if stages else None), stages


def audit(cfg: DictConfig) -> Findings:
    """Find label issues, copies (leaks first) and outliers in `cfg.data`; write the files."""
    quiet_lightning()
    check_config(cfg)
    data = instantiate(cfg.data)
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, "gpu" if device.type == "cuda" else "cpu")
    images, stages = audited_images(cfg, data, device, "bf16" in precision)
    hash_cache = hash_cache_file(cfg.data.get("scan_cache"), data.root)
    settings = OmegaConf.to_container(cfg.audit, resolve=True) | {"label_layers": list(stages)}
    findings = audit_images(images, settings, hash_cache)
    out = Path(cfg.output_dir)
    findings.write(out)
    write_pages(findings, data.root, out, cfg.audit.page_limit)
    print(
        " ".join(f"{k.split(' (')[0].replace(' ', '_')}={v}" for k, v in counts(findings).items())
    )
    print(f"report: {out / 'report.html'}")
    return findings


@exit_on_user_error
@hydra.main(config_path=CONF_DIR, config_name="audit", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Command-line entry: Hydra composes `cfg` from conf/ and the overrides."""
    audit(cfg)


if __name__ == "__main__":
    main()
