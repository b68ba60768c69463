"""Calibrated probabilities and "unknown": the temperature, ECE, the OOD score and threshold,
and what train, predict, eval and export make of them."""

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict
from PIL import Image

from src.data.images import decode
from src.data.scan import list_images
from src.eval import evaluate
from src.export import export
from src.predict import predict
from src.train import train, train_run
from src.trust.calibration import (
    checked_temperature,
    expected_calibration_error,
    fit_temperature,
)
from src.trust.fit import trust_record
from src.trust.ood import feature_bank, ood_record, threshold, unknown
from tests.conftest import command_cfg, compose_cfg, make_folder

SIZE = 64  # the trained run's image size


def toy_outputs(n: int = 60, classes: int = 3, seed: int = 0) -> dict[str, tuple]:
    """(features, logits) per split of an overconfident toy model: logits 8x a noisy truth."""
    generator = torch.Generator().manual_seed(seed)
    out, labels = {}, {}
    for name in ("train", "val", "test"):
        y = torch.arange(n) % classes
        features = F.one_hot(y, 8).float() + 0.3 * torch.randn(n, 8, generator=generator)
        logits = 8 * (F.one_hot(y, classes) + torch.randn(n, classes, generator=generator))
        out[name], labels[name] = (features, logits), y
    return out, labels


def test_temperature_is_fitted_on_val_only(tmp_path):
    outputs, labels = toy_outputs()
    cfg = compose_cfg([], tmp_path)
    record, _ = trust_record(outputs, labels, cfg, None)
    changed = labels | {"test": labels["test"].roll(1)}
    nan = labels | {"test": torch.full((len(labels["test"]),), float("nan"))}
    for other in (changed, nan):
        again, _ = trust_record(outputs, other, cfg, None)
        assert again["temperature"] == record["temperature"]
        assert again["ood"]["threshold"] == record["ood"]["threshold"]
    moved, _ = trust_record(outputs, labels | {"val": labels["val"].roll(1)}, cfg, None)
    assert moved["temperature"] != pytest.approx(record["temperature"])  # val decides


def test_temperature_lowers_val_nll_of_an_overconfident_model():
    (_, logits), labels = toy_outputs()[0]["val"], toy_outputs()[1]["val"]
    assert (logits.argmax(1) == labels).float().mean() < 0.95  # wrong sometimes, yet sure
    temperature = fit_temperature(logits, labels)
    assert temperature > 2
    before, after = F.cross_entropy(logits, labels), F.cross_entropy(logits / temperature, labels)
    assert after < 0.8 * before
    for nearby in (temperature * 0.8, temperature * 1.25):  # a minimum
        assert F.cross_entropy(logits / nearby, labels) > after


def test_temperature_is_kept_only_where_it_helps_out_of_fold():
    """An overconfident model keeps its fitted T; a calibrated one (labels drawn from its own
    softmax) gets T = 1 exactly, though a fit on all of val alone would move it off 1."""
    (_, logits), labels = toy_outputs()[0]["val"], toy_outputs()[1]["val"]
    assert checked_temperature(logits, labels) == fit_temperature(logits, labels) > 2
    generator = torch.Generator().manual_seed(3)
    logits = 2 * torch.randn(80, 4, generator=generator)
    labels = torch.multinomial(logits.softmax(1), 1, generator=generator).squeeze(1)
    assert fit_temperature(logits, labels) != pytest.approx(1.0, abs=1e-3)
    assert checked_temperature(logits, labels) == 1.0


def test_ece_equals_a_direct_computation():
    probs = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55]])
    labels = torch.tensor([0, 1, 0, 1])  # 0.95 bin: half right; 0.55 bin: both right
    assert expected_calibration_error(probs, labels) == pytest.approx(0.45)
    generator = torch.Generator().manual_seed(1)
    probs = torch.randn(500, 4, generator=generator).mul(2).softmax(1)
    labels = torch.randint(0, 4, (500,), generator=generator)
    confidence, predicted = probs.max(1)
    direct = 0.0
    for b in range(15):
        members = (confidence > b / 15) & (confidence <= (b + 1) / 15)
        if members.any():
            gap = (predicted[members] == labels[members]).float().mean() - confidence[
                members
            ].mean()
            direct += members.float().mean() * abs(float(gap))
    assert expected_calibration_error(probs, labels) == pytest.approx(float(direct), abs=1e-6)


def test_far_images_are_flagged_and_training_images_are_not():
    generator = torch.Generator().manual_seed(2)
    centres = torch.randn(3, 32, generator=generator)
    train_features = centres.repeat(40, 1) + 0.3 * torch.randn(120, 32, generator=generator)
    val = centres.repeat(100, 1) + 0.3 * torch.randn(300, 32, generator=generator)
    far = torch.randn(50, 32, generator=generator)  # other directions
    bank = feature_bank(train_features, None)
    logits = torch.zeros(1, 3)
    val_scores = unknown({"score": "knn", "k": 5, "features": bank, "threshold": 0}, logits, val, 1)
    record = ood_record("knn", 5, 0.95, val_scores[0], bank)
    # training images fare as held-out ones of their kind: 5% of those are flagged by design
    assert unknown(record, logits, train_features, 1.0)[1].float().mean() <= 0.08
    assert unknown(record, logits, far, 1.0)[1].all()


@pytest.mark.parametrize("coverage", [0.5, 0.9, 0.95, 1.0])
def test_threshold_keeps_the_stated_share_of_val(coverage):
    scores = torch.rand(203, generator=torch.Generator().manual_seed(3))
    kept = (scores <= threshold(scores, coverage)).float().mean()
    assert float(kept) == pytest.approx(math.ceil(coverage * 203) / 203)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """EfficientNet-Lite0 (64 px) on 3 colour classes with a probe head and a val split of 10
    images, trained once with the default calibration and OOD settings."""
    tmp = tmp_path_factory.mktemp("trust")
    root = make_folder(tmp / "data", per_class=12, validation=4)
    overrides = [
        "backbone=efficientnet_lite0",  # shipped weights: features that tell kinds apart
        "data=imagefolder",
        f"data.root={root}",
        f"image_size={SIZE}",
        "batch_size=8",
        "data.val_fraction=0.3",
        "trainer=cpu",
        "logger=none",
        "precision=32-true",
    ]
    train(compose_cfg(overrides, tmp / "run"))
    far = tmp / "far"
    far.mkdir()
    for i in range(6):  # black-and-white stripes: nothing like a colour class
        stripes = np.zeros((24, 24, 3), np.uint8)
        stripes[:, (i % 3) :: 3 + i % 2] = 255
        Image.fromarray(stripes if i % 2 else stripes.transpose(1, 0, 2)).save(far / f"{i}.png")
    return {"root": root, "run": tmp / "run", "ckpt": tmp / "run/checkpoints/best.ckpt", "far": far}


def predict_cfg(run: dict[str, Path], inputs: Path, out: Path, *extra: str):
    return command_cfg("predict", [f"ckpt_path={run['ckpt']}", f"inputs={inputs}", *extra], out)


def test_training_stores_temperature_and_ood_data_and_reports_ece(run):
    result = json.loads((run["run"] / "result.json").read_text())
    best, last = (
        torch.load(run["run"] / f"checkpoints/{name}.ckpt", weights_only=True)
        for name in ("best", "last")
    )
    trust = best["lightning_transfer"]["trust"]
    assert trust["temperature"] == pytest.approx(result["temperature"])
    assert trust["ood"]["score"] == "knn" and trust["ood"]["features"].dtype == torch.float16
    same = all(torch.equal(v, last["state_dict"][k]) for k, v in best["state_dict"].items())
    assert ("trust" in last["lightning_transfer"]) == same  # only where it describes last's weights
    assert {"test/ece_before_calibration", "test/ece_after_calibration"} <= set(result)
    assert result["trust_ckpt_bytes"] > trust["ood"]["features"].numel() * 2


def test_predict_flags_far_images_but_not_training_ones(run, tmp_path, capsys):
    kept = predict(predict_cfg(run, run["root"] / "training", tmp_path / "a"))
    assert all("unknown" in r and "score" in r for r in kept)
    assert sum(r["unknown"] for r in kept) <= 0.1 * len(kept)  # about as many as of val
    far = predict(predict_cfg(run, run["far"], tmp_path / "b"))
    assert all(r["unknown"] for r in far)
    assert "unknown (" in capsys.readouterr().out  # shown instead of the class
    off = predict(predict_cfg(run, run["far"], tmp_path / "c", "ood=false"))
    assert not any("unknown" in r for r in off)


def test_an_old_checkpoint_predicts_with_unknown_absent_and_one_line(run, tmp_path, capsys):
    ckpt = torch.load(run["ckpt"], weights_only=True)
    del ckpt["lightning_transfer"]["trust"]
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    records = predict(
        command_cfg("predict", [f"ckpt_path={old}", f"inputs={run['far']}"], tmp_path / "out")
    )
    assert records and not any("unknown" in r or "score" in r for r in records)
    lines = [
        line for line in capsys.readouterr().out.splitlines() if "stores no temperature" in line
    ]
    assert len(lines) == 1


def test_exported_contract_matches_predict(run, tmp_path):
    info = export(command_cfg("export", [f"ckpt_path={run['ckpt']}"], tmp_path / "export"))
    trust = torch.load(run["ckpt"], weights_only=True)["lightning_transfer"]["trust"]
    assert info["temperature"] == trust["temperature"] and info["calibrated"]
    assert info["unknown"]["threshold"] == trust["ood"]["threshold"]
    paths = list_images(run["root"] / "validation/class_1") + list_images(run["far"])
    records = predict(predict_cfg(run, run["root"] / "validation", tmp_path / "p"))
    records += predict(predict_cfg(run, run["far"], tmp_path / "q"))
    images = torch.stack([decode(p, SIZE) for p in paths])
    session = onnxruntime.InferenceSession(str(tmp_path / "export" / info["file"]))
    logits = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    probs = (logits / info["temperature"]).softmax(1)
    by_path = {r["image"]: r for r in records}
    for row, path in zip(probs, paths, strict=True):
        top = by_path[str(path)]["top"][0]
        assert top["probability"] == pytest.approx(float(row.max()), abs=1e-4)
        assert top["class"] == info["classes"][int(row.argmax())]
        record = by_path[str(path)]
        assert record["unknown"] == (record["score"] > info["unknown"]["threshold"])


def test_eval_reports_selective_accuracy_and_reliability(run, tmp_path):
    out = tmp_path / "eval"
    overrides = [f"ckpt_path={run['ckpt']}", "data=imagefolder", f"data.root={run['root']}"]
    metrics = evaluate(command_cfg("eval", overrides, out))
    assert 0 < metrics["share_kept"] <= 1 and metrics["accuracy_kept"] is not None
    assert len(metrics["risk_coverage"]) == 20 and metrics["risk_coverage"][-1]["coverage"] == 1
    assert metrics["risk_coverage"][-1]["risk"] == pytest.approx(1 - metrics["test_acc"])
    assert metrics["test_ece_after_calibration"] >= 0
    assert (out / "reliability.png").stat().st_size > 0 and (out / "risk_coverage.png").is_file()


def test_trust_stage_reads_the_best_checkpoints_weights(tiny_cfg, monkeypatch):
    """ddp_spawn's main process keeps the last fit's weights, not those its ranks tested (the
    best checkpoint's): the temperature and ECE are those of the best weights all the same."""
    straight = train_run(tiny_cfg)
    real_test = L.Trainer.test

    def test_elsewhere(trainer, model, *args, **kwargs):
        out = real_test(trainer, model, *args, **kwargs)
        if kwargs.get("ckpt_path") == "best":  # the tested weights stay in another process
            torch.nn.init.normal_(model.head.weight, std=5.0)
        return out

    monkeypatch.setattr(L.Trainer, "test", test_elsewhere)
    with open_dict(tiny_cfg):
        tiny_cfg.output_dir = str(Path(tiny_cfg.output_dir).with_name("spawned"))
    Path(tiny_cfg.output_dir).mkdir()
    spawned = train_run(tiny_cfg)
    for key in ("temperature", "test/ece_before_calibration", "test/ece_after_calibration"):
        assert spawned[key] == pytest.approx(straight[key], abs=1e-6), key
