"""Distributed training that gives one model: a staged fine-tune under DDP keeps the ranks equal,
and a DDP test counts each test image once, as a single process does."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torchvision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import src.train
from src.model.inference import load_checkpoint, logits_of_files
from src.run.callbacks import EpochTimer
from src.train import train
from tests.conftest import calibrated_mobilenet_v2, compose_cfg, make_folder, tiny_overrides


class RankWeights(EpochTimer):
    """Saves each rank's backbone after training (module-level: spawned ranks import it)."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = Path(trainer.default_root_dir)
        torch.save(pl_module.backbone.state_dict(), out / f"rank{trainer.global_rank}.pt")


def ddp_cfg(root: Path, weights: Path | str, out: Path, *extra: str):
    base = [*tiny_overrides(root, weights), "trainer=ddp", "trainer.accelerator=cpu"]
    return compose_cfg([*base, "trainer.devices=2", *extra], out)


@pytest.mark.slow
def test_staged_fine_tune_under_ddp_ends_with_one_model(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(src.train, "EpochTimer", RankWeights)
    root = make_folder(tmp_path / "data", per_class=8, validation=3)
    torch.manual_seed(0)
    start = torchvision.models.mobilenet_v2(weights=None).state_dict()
    torch.save(start, tmp_path / "start.pth")
    staged = ["finetune=staged", "finetune.unfreeze_at_epoch=1", "finetune.warmup_epochs=0"]
    cfg = ddp_cfg(root, tmp_path / "start.pth", tmp_path / "run", *staged,
                  "trainer.max_epochs=2", "optimizer=adam", "optimizer.lr=1e-2")  # fmt: skip
    train(cfg)
    rank0, rank1 = (torch.load(tmp_path / f"run/rank{r}.pt", weights_only=True) for r in (0, 1))
    for name, tensor in rank0.items():
        assert torch.equal(tensor, rank1[name]), name  # the ranks did not drift apart
    assert not torch.equal(rank0["features.0.0.weight"], start["features.0.0.weight"])  # learned


@pytest.mark.slow
def test_ddp_test_counts_each_image_once_like_a_single_process(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """15 test images over 2 ranks (8 and 7): the accuracies and the loss equal those of a single
    process's per-image predictions, which differ across images (a calibrated backbone): a constant
    predictor no longer scores 1/3 whatever the counting."""
    root = make_folder(tmp_path / "data", per_class=8, validation=5)  # 15: uneven over 2 ranks
    weights = calibrated_mobilenet_v2(root, tmp_path / "calibrated.pth")
    cfg = ddp_cfg(root, weights, tmp_path / "ddp", "trainer.max_epochs=1", "logger=tensorboard")
    objective = train(cfg)
    assert "MEMBER: 2/2" in capfd.readouterr().err  # the second rank joined
    ckpt = tmp_path / "ddp/checkpoints/best.ckpt"
    model = load_checkpoint(str(ckpt))
    data = json.loads((tmp_path / "ddp/result.json").read_text())
    assert data["val/acc"] == objective and data["trainable_params"] == 3_843  # cfg.objective
    # the timings the ranks measured (the main process's own timer saw no epoch)
    assert 0 < data["first_epoch_s"] == data["mean_epoch_s"] <= data["fit_s"] < data["wall_s"]
    paths = sorted((root / "validation").rglob("*.png"))
    scores, _ = logits_of_files(model, paths, torch.device("cpu"))
    labels = torch.tensor([int(p.parent.name[-1]) for p in paths])
    predicted = scores.argmax(1)
    assert len(predicted.unique()) > 1  # per-image predictions differ across images
    recalls = [float((predicted[labels == c] == c).float().mean()) for c in range(3)]
    assert data["n_test"] == 15
    assert data["test/acc"] == pytest.approx(float((predicted == labels).float().mean()), abs=1e-6)
    assert data["test/balanced_acc"] == pytest.approx(sum(recalls) / 3, abs=1e-6)
    # the loss too: a mean over the 15 images once (ddp_spawn's CPU ranks share the parent's
    # metric tensors; unreset, they summed the test before training into this one)
    loss = torch.nn.functional.cross_entropy(scores, labels)
    assert data["test/loss"] == pytest.approx(float(loss), abs=1e-5)
    events = EventAccumulator(str(tmp_path / "ddp"), size_guidance={"images": 0})
    events.Reload()  # the final figures, made in the main process after the spawned ranks
    assert {"test/confusion_matrix", "test/gradcam"} <= set(events.Tags()["images"])


@pytest.mark.slow
def test_multilabel_ddp_test_counts_each_image_once_like_a_single_process(tmp_path: Path) -> None:
    """A multi-label table's 7 test images over 2 ranks: mAP, F1s, subset accuracy and Hamming
    loss at the run's thresholds equal those of a single process's per-image probabilities."""
    from hydra.utils import instantiate

    from src.model.metrics import multilabel_metrics
    from src.model.network import load_model
    from tests.test_multilabel import make_label_table, table_overrides

    file = make_label_table(tmp_path / "data", count=28)
    overrides = table_overrides(file, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    cfg = compose_cfg([*overrides, "trainer.max_epochs=1"], tmp_path / "ddp")
    train(cfg)
    result = json.loads((tmp_path / "ddp/result.json").read_text())
    model = load_model(tmp_path / "ddp/checkpoints/best.ckpt").eval()
    data = instantiate(cfg.data)
    data.setup()
    test = data.datasets["test"]
    with torch.no_grad():
        probs = model(test.images).sigmoid()
    assert result["n_test"] == len(test.labels) == 7  # uneven over 2 ranks: 4 and 3
    thresholds = torch.tensor(list(result["thresholds"].values()))
    for key, value in multilabel_metrics(probs, test.labels, thresholds).items():
        assert result[f"test/{key}"] == pytest.approx(value, abs=1e-5), key
    low, high = result["test/mAP_ci95"]  # the main process scored the test split itself
    assert low <= result["test/mAP"] <= high and low < high
