"""Evaluate, predict, explain and export a trained checkpoint; the training run's final figures."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import src.eval
from src.data.images import decode
from src.data.module import ImageFolderData
from src.data.scan import list_images
from src.eval import evaluate
from src.explain import explain
from src.export import export
from src.model.inference import chunks, gradcam, target_layer
from src.model.module import TransferModel
from src.model.network import load_model
from src.predict import predict
from src.run.errors import UserError
from src.train import train
from tests.conftest import (
    CONF_DIR,
    calibrate_batchnorm,
    calibrated_mobilenet_v2,
    command_cfg,
    compose_cfg,
    make_folder,
    tiny_overrides,
)

SIZE, SQUARE = 128, 64  # the square images' side and the planted square's side


def image_tags(run_dir: Path) -> list[str]:
    """The image tags of the TensorBoard events in `run_dir`."""
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    return events.Tags()["images"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny MobileNetV2 (32 px, 3 colour classes, BatchNorm calibrated on the images so that
    its features carry signal) trained once, with TensorBoard logging."""
    tmp = tmp_path_factory.mktemp("tiny")
    root = make_folder(tmp / "data", per_class=8, validation=4)
    weights = calibrated_mobilenet_v2(root, tmp / "calibrated.pth")
    overrides = [o for o in tiny_overrides(root, weights) if o != "logger=none"]  # TensorBoard
    cfg = compose_cfg(overrides, tmp / "run")
    train(cfg)
    return {"root": root, "run": tmp / "run", "ckpt": tmp / "run/checkpoints/best.ckpt"}


@pytest.fixture(scope="module")
def squares(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[Path, tuple[int, int]]]:
    """EfficientNet-Lite0's head trained to tell a bright square on dark noise from noise alone.

    Returns the checkpoint and, for each validation image with a square, its top-left corner.
    """
    tmp = tmp_path_factory.mktemp("squares")
    generator = torch.Generator().manual_seed(0)
    corners = {}
    for split, count in (("training", 20), ("validation", 8)):
        for name in ("blank", "square"):
            folder = tmp / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 60, (SIZE, SIZE, 3), generator=generator)
                if name == "square":
                    y, x = torch.randint(0, SIZE - SQUARE + 1, (2,), generator=generator).tolist()
                    pixels[y : y + SQUARE, x : x + SQUARE] = 230
                    corners[folder / f"{i}.png"] = (y, x)
                Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / f"{i}.png")
    cfg = compose_cfg(
        [
            "backbone=efficientnet_lite0",
            "data=imagefolder",
            f"data.root={tmp / 'data'}",
            f"image_size={SIZE}",
            "batch_size=8",
            "head_fit=recipe",  # the measured setting: Adam epochs (see src/backbones.py SHIPPED)
            "optimizer=adam",
            "optimizer.lr=1e-2",
            "trainer=cpu",
            "trainer.max_epochs=5",
            "logger=none",
            "precision=32-true",
        ],
        tmp / "run",
    )
    train(cfg)
    validation = {p: c for p, c in corners.items() if "validation" in p.parts}
    return tmp / "run/checkpoints/best.ckpt", validation


def test_eval_writes_a_consistent_report(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "eval"
    cfg = command_cfg(
        "eval", [f"ckpt_path={tiny['ckpt']}", "data=imagefolder", f"data.root={tiny['root']}"], out
    )
    metrics = evaluate(cfg)
    for name in ("report.md", "metrics.json", "confusion_matrix.png", "misclassified.png"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert {"eval/confusion_matrix", "eval/misclassified"} <= set(image_tags(out))
    n = 3 * 4  # the validation folder: 4 images of each of 3 classes
    matrix = torch.tensor(metrics["confusion_matrix"])
    supports = [m["support"] for m in metrics["per_class"].values()]
    assert matrix.shape == (3, 3) and metrics["n_images"] == n
    assert matrix.sum() == n and sum(supports) == n == metrics["macro_avg"]["support"]
    assert matrix.sum(1).tolist() == supports == [4, 4, 4]
    assert metrics["test_acc"] == pytest.approx(matrix.trace().item() / n)
    assert metrics["n_misclassified"] == len(metrics["misclassified"]) == n - matrix.trace()
    for c, scores in enumerate(metrics["per_class"].values()):
        assert scores["recall"] == pytest.approx(matrix[c, c].item() / matrix[c].sum().item())
        if matrix[:, c].sum() > 0:
            assert scores["precision"] == pytest.approx(matrix[c, c] / matrix[:, c].sum())
    # the same checkpoint and test set as the training run's final test
    result = json.loads((tiny["run"] / "result.json").read_text())
    assert metrics["test_acc"] == pytest.approx(result["test/acc"], abs=1e-6)
    assert metrics["test_loss"] == pytest.approx(result["test/loss"], abs=1e-4)
    assert "| class_0 |" in (out / "report.md").read_text()


def test_training_run_logs_final_confusion_matrix_and_heatmaps(tiny: dict[str, Path]) -> None:
    assert {"test/confusion_matrix", "test/gradcam"} <= set(image_tags(tiny["run"]))


def test_predict_top_k_from_checkpoint_class_names(tiny: dict[str, Path], tmp_path: Path) -> None:
    folder = tiny["root"] / "validation/class_1"
    cfg = command_cfg(
        "predict", [f"ckpt_path={tiny['ckpt']}", f"inputs={folder}", "top_k=2"], tmp_path / "a"
    )
    records = predict(cfg)
    assert [r["image"] for r in records] == [str(p) for p in list_images(folder)]
    for record in records:
        probs = [t["probability"] for t in record["top"]]
        assert len(probs) == 2 and probs[0] >= probs[1] and sum(probs) <= 1 + 1e-6
        assert {t["class"] for t in record["top"]} <= {"class_0", "class_1", "class_2"}
    rows = (tmp_path / "a/predictions.csv").read_text().splitlines()
    assert rows[0] == "image,rank,class,probability,score,unknown,error" and len(rows) == 1 + 4 * 2
    assert json.loads((tmp_path / "a/predictions.json").read_text()) == records
    one = folder / "image0.png"
    cfg = command_cfg(
        "predict", [f"ckpt_path={tiny['ckpt']}", f"inputs={one}", "top_k=9"], tmp_path / "b"
    )
    (record,) = predict(cfg)
    assert len(record["top"]) == 3  # at most the number of classes
    assert sum(t["probability"] for t in record["top"]) == pytest.approx(1, abs=1e-5)
    assert [t["class"] for t in record["top"][:2]] == [t["class"] for t in records[0]["top"]]
    for alone, in_batch in zip(record["top"], records[0]["top"], strict=False):
        assert alone["probability"] == pytest.approx(in_batch["probability"], abs=1e-5)


def test_predict_on_a_class_folder_reports_rows_accuracy_and_bad_files(
    tiny: dict[str, Path], tmp_path: Path, capsys
) -> None:
    folder = tmp_path / "validation"
    shutil.copytree(tiny["root"] / "validation", folder)
    (folder / "class_0" / "broken.png").write_bytes(b"not an image")
    cfg = command_cfg("predict", [f"ckpt_path={tiny['ckpt']}", f"inputs={folder}"], tmp_path / "a")
    records = predict(cfg)
    assert len(records) == 3 * 4 + 1  # searched recursively, the bad file a row of its own
    broken = next(r for r in records if r["image"].endswith("broken.png"))
    assert "error" in broken and "top" not in broken
    good = [r for r in records if "top" in r]
    assert {r["true"] for r in good} == {"class_0", "class_1", "class_2"}
    right = sum(r["top"][0]["class"] == r["true"] for r in good)
    out = capsys.readouterr().out
    assert f"accuracy {right / 12:.4f} ({right} of 12 images by their folder's class" in out
    assert "1 file(s) could not be read" in out


@pytest.mark.slow
def test_predict_cli_prints_a_table(tiny: dict[str, Path], tmp_path: Path) -> None:
    folder = tiny["root"] / "validation/class_2"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "src.predict",
            f"ckpt_path={tiny['ckpt']}",
            f"inputs={folder}",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=Path(CONF_DIR).parent,
        check=True,
    )
    header, *rows = run.stdout.splitlines()[:5]
    assert header.split() == ["image", "top1", "top2", "top3"]
    assert [row.split()[0] for row in rows] == [str(p) for p in list_images(folder)]
    assert (tmp_path / "predictions.csv").is_file()


@pytest.mark.parametrize("command", ["eval", "predict", "explain", "export"])
def test_missing_checkpoint_is_a_user_error(
    command: str, tiny: dict[str, Path], tmp_path: Path
) -> None:
    run = {"eval": evaluate, "predict": predict, "explain": explain, "export": export}[command]
    inputs = tiny["root"] / "validation/class_0"
    cfg = command_cfg(
        command, [f"ckpt_path={tmp_path / 'no.ckpt'}", f"++inputs={inputs}"], tmp_path / "out"
    )
    with pytest.raises(UserError, match="not found"):
        run(cfg)


def test_bad_checkpoint_or_inputs_are_user_errors(tiny: dict[str, Path], tmp_path: Path) -> None:
    image = tiny["root"] / "validation/class_0/image0.png"
    (tmp_path / "empty").mkdir()
    for overrides, message in (
        ([f"ckpt_path={image}", f"inputs={image}"], "not a checkpoint of src.train"),
        ([f"ckpt_path={tiny['ckpt']}", f"inputs={tmp_path / 'none'}"], "inputs .* not found"),
        ([f"ckpt_path={tiny['ckpt']}", f"inputs={tmp_path / 'empty'}"], "no images"),
        ([f"ckpt_path={tiny['ckpt']}", f"inputs={image}", "top_k=0"], "top_k=0"),
    ):
        cfg = command_cfg("predict", overrides, tmp_path / message.replace(" ", "_")[:8])
        with pytest.raises(UserError, match=message):
            predict(cfg)


def test_explain_writes_one_picture_per_image(tiny: dict[str, Path], tmp_path: Path) -> None:
    folder = tiny["root"] / "validation/class_0"
    overrides = [f"ckpt_path={tiny['ckpt']}", f"inputs={folder}", "target=class_2"]
    written = explain(command_cfg("explain", overrides, tmp_path / "out"))
    assert [p.name for p in written] == [f"{p.stem}_gradcam.png" for p in list_images(folder)]
    with Image.open(written[0]) as picture:
        assert picture.width > picture.height > 100  # the image beside its overlay
    overrides[-1] = "target=no_such_class"
    with pytest.raises(UserError, match="unknown target class"):
        explain(command_cfg("explain", overrides, tmp_path / "bad"))


@pytest.mark.parametrize(
    ("backbone", "layer"),
    [
        ("mobilenet_v2", "backbone.features"),  # its last conv block's output
        ("vgg19", "backbone.features.35"),  # conv5_4 after its ReLU, before the last max pool
        ("efficientnet_lite0", "backbone.blocks.5"),  # measured: see test below
    ],
)
def test_default_gradcam_layer_for_every_configured_backbone(backbone: str, layer: str) -> None:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="train", overrides=[f"backbone={backbone}", "backbone.weights=null"]
        )
    model = TransferModel(dict(cfg.backbone), ["a", "b"], image_size=64)
    assert target_layer(model) is model.get_submodule(layer)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    images[2:] //= 4
    calibrate_batchnorm(model.backbone, model.normalise(images))
    heatmaps = gradcam(model, chunks(images, 2), [0, 1, 0, 1], target_layer(model))
    assert heatmaps.shape == (4, 64, 64)
    assert np.isfinite(heatmaps).all() and heatmaps.min() >= 0 and heatmaps.max() <= 1
    assert max(abs(h - heatmaps[0]).max() for h in heatmaps[1:]) > 1e-3  # they depend on input
    with pytest.raises(UserError, match="no module"):
        target_layer(model, "backbone.no_such_layer")


def test_gradcam_peaks_inside_the_planted_square(squares) -> None:
    ckpt, corners = squares
    model = load_model(ckpt)
    assert model.classes == ["blank", "square"]
    images = torch.stack([decode(path, SIZE) for path in corners])
    assert (model(images).argmax(1) == 1).all()
    heatmaps = gradcam(model, chunks(images, 16), [1] * len(images), target_layer(model))
    for heatmap, (y, x) in zip(heatmaps, corners.values(), strict=True):
        peak_y, peak_x = np.unravel_index(heatmap.argmax(), heatmap.shape)
        assert y <= peak_y < y + SQUARE and x <= peak_x < x + SQUARE


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_the_checkpoint(fmt: str, tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    info = export(command_cfg("export", [f"ckpt_path={tiny['ckpt']}", f"format={fmt}"], out))
    contract = json.loads((out / "model.json").read_text())
    assert contract == info
    assert contract["classes"] == ["class_0", "class_1", "class_2"]
    assert contract["input"]["shape"] == ["batch", 3, 32, 32]
    assert contract["input"]["dtype"] == "uint8" and contract["input"]["channels"] == "RGB"
    assert contract["normalisation"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert contract["parity"]["max_abs_diff"] <= 1e-4
    # independently: the exported file on real images, a batch size other than the sample's
    images = torch.stack([decode(p, 32) for p in list_images(tiny["root"] / "validation/class_0")])
    with torch.inference_mode():
        expected = load_model(tiny["ckpt"])(images)
        if fmt == "onnx":
            session = onnxruntime.InferenceSession(str(out / contract["file"]))
            got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
        else:
            got = torch.jit.load(out / contract["file"])(images)
    assert got.shape == (4, 3)
    assert expected.std(0).mean() > 1e-3  # logits that depend on the image, not the bias alone
    assert (got - expected).abs().max() <= 1e-4


def test_export_fails_above_the_tolerance(tiny: dict[str, Path], tmp_path: Path) -> None:
    cfg = command_cfg("export", [f"ckpt_path={tiny['ckpt']}", "tolerance=-1"], tmp_path / "out")
    with pytest.raises(UserError, match="do not ship it"):
        export(cfg)
    assert (tmp_path / "out/model.json").is_file()  # written before the verdict, kept


def test_eval_with_another_seed_still_tests_on_held_out_images(tmp_path: Path, monkeypatch):
    root = make_folder(tmp_path / "data", per_class=10)  # no validation/: test from training/
    weights = calibrated_mobilenet_v2(root, tmp_path / "calibrated.pth")
    train(compose_cfg(tiny_overrides(root, weights), tmp_path / "run"))
    built = []
    real = src.eval.instantiate
    monkeypatch.setattr(
        src.eval, "instantiate", lambda *a, **k: built.append(real(*a, **k)) or built[-1]
    )
    overrides = [
        f"ckpt_path={tmp_path / 'run/checkpoints/best.ckpt'}",
        "data=imagefolder",
        f"data.root={root}",
        "seed=7",
        "logger=none",
    ]
    metrics = evaluate(command_cfg("eval", overrides, tmp_path / "eval"))
    trained = ImageFolderData(str(root), image_size=32, seed=42)  # the training run's split
    tested = set(built[0].test_split.paths)
    assert tested == set(trained.test_split.paths) and metrics["n_images"] == len(tested) == 3
    assert not tested & set(trained.train_split.paths) and not tested & set(trained.val_split.paths)
    other = ImageFolderData(str(root), image_size=32, seed=7)
    assert set(other.test_split.paths) != tested  # seed 7 alone would have tested other images
