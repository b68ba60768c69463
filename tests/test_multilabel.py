"""Multi-label classification: the table's label matrix, stratified splits, the per-label probe,
the metrics and a run end to end."""

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from src.data.multilabel import read_label_table
from src.data.multilabel_splits import holdout_split, kfold_split, warn_missing
from src.run.errors import UserError


def write_images(folder: Path, count: int, size: int = 16) -> list[str]:
    """`count` small PNGs (noise) in `folder`; their names."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    names = []
    for i in range(count):
        pixels = torch.randint(0, 255, (size, size, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"im{i}.png")
        names.append(f"im{i}.png")
    return names


def write_table(tmp_path: Path, header: str, rows: list[str], name: str = "labels.csv") -> Path:
    """A table file next to images im0.png ... (one per row)."""
    write_images(tmp_path, len(rows))
    file = tmp_path / name
    file.write_text("\n".join([header, *rows]) + "\n")
    return file


@pytest.mark.parametrize(
    ("cells", "delimiter"),
    [(["cat dog", "dog", "", "bird cat"], None), (["cat;dog", "dog", "", "bird; cat"], None),
     (["cat|dog", "dog", "", "bird|cat"], "|")],
)  # fmt: skip
def test_label_cells_split_by_each_delimiter(tmp_path: Path, cells: list[str], delimiter) -> None:
    rows = [f'im{i}.png,"{cell}"' for i, cell in enumerate(cells)]
    labels = read_label_table(write_table(tmp_path, "path,labels", rows), label_delimiter=delimiter)
    assert labels.task == "multilabel"
    assert labels.classes == ["bird", "cat", "dog"]
    assert labels.targets.tolist() == [[0, 1, 1], [0, 0, 1], [0, 0, 0], [1, 1, 0]]


def test_binary_columns_and_tsv_jsonl(tmp_path: Path) -> None:
    csv = write_table(
        tmp_path, "file,cat,dog,note", ["im0.png,1,0,a", "im1.png,0,0,b", "im2.png,1,1,c"]
    )
    labels = read_label_table(csv)
    assert (labels.task, labels.classes) == ("multilabel", ["cat", "dog"])
    assert labels.targets.tolist() == [[1, 0], [0, 0], [1, 1]]
    tsv = tmp_path / "labels.tsv"
    tsv.write_text("path\tlabels\nim0.png\tcat dog\nim1.png\tdog\n")
    assert read_label_table(tsv).targets.tolist() == [[1, 1], [0, 1]]
    jsonl = tmp_path / "labels.jsonl"
    jsonl.write_text(
        '{"path": "im0.png", "labels": "cat;dog"}\n{"path": "im1.png", "labels": ""}\n'
    )
    assert read_label_table(jsonl).targets.tolist() == [[1, 1], [0, 0]]


def test_auto_task_one_label_per_row_is_multiclass(tmp_path: Path) -> None:
    labels = read_label_table(write_table(tmp_path, "path,label", ["im0.png,cat", "im1.png,dog"]))
    assert labels.task == "multiclass"
    forced = read_label_table(tmp_path / "labels.csv", task="multilabel")
    assert forced.task == "multilabel" and forced.targets.tolist() == [[1, 0], [0, 1]]


@pytest.mark.parametrize(
    ("header", "rows", "task", "message"),
    [
        ("path,label", ["im0.png,cat", "im1.png,", "im2.png,dog"], "auto",
         "an empty label cell (column 'label') on line(s) 3"),
        ("path,labels", ["im0.png,cat dog", "im1.png,dog"], "multiclass",
         "several labels (task=multiclass) on line(s) 2"),
        ("path,cat,dog", ["im0.png,1,0", "im1.png,yes,1", "im2.png,0,1"], "auto",
         "a cell of label column 'cat' that is not 0 or 1 on line(s) 3"),
        ("path,labels,split", ["im0.png,cat,train", "im1.png,cat dog,val", "im2.png,dog bird,test",
                               "im3.png,cat dog,train"], "auto",
         "the label(s) bird only in val/test rows (first one) on line(s) 4"),
        ("path,labels", ["im0.png,cat", "im1.png,dog"], "both", "unknown task='both'"),
    ],
)  # fmt: skip
def test_bad_rows_end_in_one_line(
    tmp_path: Path, header: str, rows: list[str], task: str, message: str
) -> None:
    with pytest.raises(UserError) as raised:
        read_label_table(write_table(tmp_path, header, rows), task=task)
    assert message in str(raised.value)
    assert "Fix:" in str(raised.value) and "\n" not in str(raised.value)


def test_missing_image_named_or_skipped(tmp_path: Path) -> None:
    file = write_table(tmp_path, "path,labels", ["im0.png,cat", "im1.png,dog cat", "im9.png,dog"])
    with pytest.raises(UserError, match="a missing image file on line.s. 4"):
        read_label_table(file)
    labels = read_label_table(file, on_bad_image="skip")
    assert len(labels.table.paths) == 2 and labels.targets.tolist() == [[1, 0], [1, 1]]


def random_targets(n: int, labels: int, seed: int = 0) -> torch.Tensor:
    """n rows of labels with unequal rates (0.5 down to ~0.1), some rows with none."""
    rates = torch.linspace(0.5, 0.1, labels)
    return (torch.rand(n, labels, generator=torch.Generator().manual_seed(seed)) < rates).float()


def test_holdout_split_keeps_each_label_share() -> None:
    targets = random_targets(200, 5)
    parts = holdout_split(targets, 0.2, 0.2, seed=3)
    assert sorted(sum(parts.values(), [])) == list(range(200))
    assert [len(parts[p]) for p in ("train", "val", "test")] == [120, 40, 40]
    share = targets.mean(0)
    for ids in parts.values():  # iterative stratification: within 2 images of the share
        assert ((targets[ids].mean(0) - share).abs() * len(ids) <= 2).all()
    assert holdout_split(targets, 0.2, 0.2, seed=3) == parts  # seeded
    assert holdout_split(targets, 0.2, 0.2, seed=4) != parts


def test_kfold_split_covers_every_image_once() -> None:
    targets = random_targets(60, 4)
    tests = [kfold_split(targets, 3, fold, 0.1, seed=0)["test"] for fold in range(3)]
    assert sorted(sum(tests, [])) == list(range(60))
    for ids in tests:
        assert (targets[ids].sum(0) > 0).all()


def test_rare_label_named(caplog: pytest.LogCaptureFixture) -> None:
    targets = torch.zeros(30, 2)
    targets[::2, 0] = 1
    targets[7, 1] = 1  # one image: it cannot be in train, val and test
    parts = holdout_split(targets, 0.2, 0.2, seed=0)
    with caplog.at_level(logging.WARNING):
        missing = warn_missing(targets, parts, ["common", "rare"])
    assert len(missing) == 1 and missing[0].startswith("rare (1 image(s), none in")
    assert "rare (1 image(s)" in caplog.text


def label_problem(n: int, features: int = 6, labels: int = 3, seed: int = 0):
    """Features with a linear signal for each label (plus noise), and its 0/1 targets."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator, dtype=torch.float64) * 3 + 1
    w = torch.randn(labels, features, generator=generator, dtype=torch.float64)
    noise = torch.randn(n, labels, generator=generator, dtype=torch.float64) * 2
    return x, ((x - 1) @ w.T / 3 + noise > 0.5).double()


def test_label_probe_matches_scikit_learn(one_thread) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from src.frozen.label_probe import fit_label_probe

    x, y = label_problem(120)
    val_x, val_y = label_problem(60, seed=1)
    l2 = 0.01
    fit = fit_label_probe(x, y, val_x, val_y, l2_grid=[l2])
    for k in range(y.shape[1]):
        pipe = make_pipeline(
            StandardScaler(), LogisticRegression(C=1 / (l2 * len(x)), tol=1e-10, max_iter=10000)
        ).fit(x.numpy(), y[:, k].numpy())
        expected = torch.from_numpy(pipe.decision_function(val_x.numpy()))
        got = val_x @ fit.weight[k].double() + fit.bias[k].double()
        assert torch.allclose(got, expected, atol=1e-4), k


def test_label_probe_chooses_strength_on_val(one_thread) -> None:
    from src.frozen.label_probe import fit_label_probe

    x, y = label_problem(80)
    val_x, val_y = label_problem(60, seed=1)
    grid = [1.0, 1e-2, 1e-4]
    by_loss = fit_label_probe(x, y, val_x, val_y, l2_grid=grid, refit_tol=None)
    assert [p["l2"] for p in by_loss.grid] == grid
    assert by_loss.l2 == min(by_loss.grid, key=lambda p: p["val_loss"])["l2"]
    by_map = fit_label_probe(x, y, val_x, val_y, l2_grid=grid, select="mAP", refit_tol=None)
    assert by_map.l2 == max(by_map.grid, key=lambda p: p["val_mAP"])["l2"]
    with pytest.raises(ValueError, match="no positive or no negative"):
        fit_label_probe(x, torch.cat([y, torch.zeros(80, 1)], 1), val_x, val_y, l2_grid=grid)


def predictions(n: int, labels: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities with ties (rounded to 0.05) that carry some signal, and 0/1 targets."""
    generator = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, labels, generator=generator) < 0.35).double()
    noise = torch.rand(n, labels, generator=generator, dtype=torch.float64)
    return ((0.4 * targets + 0.6 * noise) * 20).round() / 20, targets


def test_metrics_match_scikit_learn() -> None:
    from sklearn import metrics as sk

    from src.model.metrics import average_precision, multilabel_metrics, per_label_metrics

    probs, targets = predictions(80, 4, seed=0)
    thresholds = torch.tensor([0.3, 0.5, 0.55, 0.7], dtype=torch.float64)
    got = multilabel_metrics(probs, targets, thresholds)
    y, p = targets.numpy().astype(int), probs.numpy()
    pred = (probs >= thresholds).numpy().astype(int)
    ap = [sk.average_precision_score(y[:, k], p[:, k]) for k in range(4)]
    assert average_precision(probs, targets).tolist() == pytest.approx(ap, abs=1e-6)
    assert got["mAP"] == pytest.approx(sum(ap) / 4, abs=1e-6)
    assert got["micro_f1"] == pytest.approx(sk.f1_score(y, pred, average="micro"))
    assert got["macro_f1"] == pytest.approx(sk.f1_score(y, pred, average="macro", zero_division=0))
    assert got["subset_acc"] == pytest.approx(sk.accuracy_score(y, pred))
    assert got["hamming_loss"] == pytest.approx(sk.hamming_loss(y, pred))
    rows = per_label_metrics(probs, targets, thresholds, list("abcd"))
    precision, recall, f1, support = sk.precision_recall_fscore_support(y, pred, zero_division=0)
    assert [r["precision"] for r in rows] == pytest.approx(precision.tolist())
    assert [r["recall"] for r in rows] == pytest.approx(recall.tolist())
    assert [r["f1"] for r in rows] == pytest.approx(f1.tolist())
    assert [r["support"] for r in rows] == support.tolist()
    only_one = targets.clone()
    only_one[:, 1:] = 0  # a bootstrap resample of a small test split can hold one label alone
    assert average_precision(probs, only_one)[0] == pytest.approx(ap[0], abs=1e-6)
    assert average_precision(probs, only_one)[1:].isnan().all()


def test_thresholds_are_the_f1_best_cuts_of_val() -> None:
    from sklearn.metrics import f1_score

    from src.model.metrics import DEFAULT_THRESHOLD, choose_thresholds

    probs, targets = predictions(60, 3, seed=1)
    targets[:, 2] = 0  # no positive: the default cut
    thresholds = choose_thresholds(probs, targets)
    assert thresholds[2] == DEFAULT_THRESHOLD
    for k in range(2):  # no cut among the val scores beats the chosen one
        y = targets[:, k].numpy()

        def f1(cut: float, k: int = k, y=y) -> float:
            return f1_score(y, (probs[:, k] >= cut).numpy())

        best = max(f1(c) for c in probs[:, k].unique().tolist())
        assert f1(thresholds[k].item()) == pytest.approx(best)
    other_probs, _ = predictions(60, 3, seed=2)  # thresholds depend on val only
    assert torch.equal(choose_thresholds(probs, targets), thresholds)
    assert not torch.equal(choose_thresholds(other_probs, targets), thresholds)


LABEL_COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 60, 230)}


def make_label_table(root: Path, count: int = 40, size: int = 24) -> Path:
    """A multi-label table: each image has a quadrant per label, that label's colour where the
    image has it (half the images, independently), grey noise elsewhere."""
    root.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    rows = ["path,labels"]
    half = size // 2
    for i in range(count):
        pixels = torch.randint(90, 150, (size, size, 3), generator=generator)
        present = []
        for q, (name, colour) in enumerate(LABEL_COLOURS.items()):
            if torch.rand(1, generator=generator).item() < 0.5:
                top, left = (q // 2) * half, (q % 2) * half
                pixels[top : top + half, left : left + half] = torch.tensor(colour)
                present.append(name)
        Image.fromarray(pixels.to(torch.uint8).numpy()).save(root / f"im{i}.png")
        rows.append(f"im{i}.png,{';'.join(present)}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def table_overrides(file: Path, *extra: str) -> list[str]:
    """A fast CPU run on the table `file` (tiny_overrides with data=table)."""
    from tests.conftest import tiny_overrides

    base = [o for o in tiny_overrides(file) if not o.startswith(("data=", "data.root="))]
    return [*base, "data=table", f"data.root={file}", "data.val_fraction=0.25",
            "data.test_fraction=0.25", *extra]  # fmt: skip


def instantiate_data(cfg):
    """The data module of a composed config."""
    from hydra.utils import instantiate

    return instantiate(cfg.data)


@pytest.mark.parametrize("group", ["imagefolder", "footwear", "table"])
def test_a_multilabel_table_is_detected_by_every_data_group(tmp_path: Path, group: str) -> None:
    """`data.root=labels.csv` alone, with the default data group too: a row listing several
    labels makes a multi-label data module, never a class named by the joined labels."""
    from src.data.module import ImageFolderData
    from src.data.multilabel_module import MultiLabelData
    from tests.conftest import compose_cfg

    file = make_label_table(tmp_path / "data")
    overrides = [o for o in table_overrides(file) if o != "data=table"]
    data = instantiate_data(compose_cfg([f"data={group}", *overrides], tmp_path / "run"))
    assert isinstance(data, MultiLabelData) and data.classes == sorted(LABEL_COLOURS)
    one = file.with_name("one.csv")  # the labelled images, one label each: multi-class
    rows = [line.split(";")[0] for line in file.read_text().splitlines() if line[-1] != ","]
    one.write_text("\n".join(rows) + "\n")
    overrides = [f"data.root={one}" if o.startswith("data.root=") else o for o in overrides]
    data = instantiate_data(compose_cfg([f"data={group}", *overrides], tmp_path / "run2"))
    assert type(data) is ImageFolderData


@pytest.mark.slow
def test_multilabel_run_end_to_end(tmp_path: Path, one_thread) -> None:
    """Frozen backbone, probe head: trains from the CSV alone; the thresholds in the checkpoint
    are the val predictions' F1-best cuts; the test metrics are those at the thresholds."""
    import json

    from src.data.multilabel_module import MultiLabelData
    from src.model.metrics import choose_thresholds
    from src.model.network import load_model
    from src.train import train
    from tests.conftest import compose_cfg

    file = make_label_table(tmp_path / "data")
    cfg = compose_cfg(table_overrides(file, "head_fit=probe"), tmp_path / "run")
    objective = train(cfg)
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert objective == result["val/mAP"]
    for key in ("test/mAP", "test/micro_f1", "test/macro_f1", "test/subset_acc",
                "test/hamming_loss", "before/test_mAP"):  # fmt: skip
        assert 0 <= result[key] <= 1, key
    low, high = result["test/mAP_ci95"]
    assert low <= result["test/mAP"] <= high
    model = load_model(tmp_path / "run" / "checkpoints" / "best.ckpt")
    thresholds = model.record["thresholds"]
    assert list(result["thresholds"].values()) == thresholds and len(thresholds) == 3
    data = instantiate_data(cfg)
    assert isinstance(data, MultiLabelData) and data.classes == ["blue", "green", "red"]
    assert data.split_record() == model.record["split"]
    data.setup()
    val = data.datasets["val"]
    with torch.no_grad():
        probs = model(val.images).sigmoid()
    expected = choose_thresholds(probs, val.labels)  # the val split's cuts, nothing else's
    assert thresholds == pytest.approx(expected.tolist(), abs=1e-4)

    # predict: every label at or above its threshold; the exported model gives the same logits
    from src.export import export
    from src.predict import predict
    from tests.conftest import command_cfg

    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    records = predict(command_cfg("predict", [f"ckpt_path={ckpt}", f"inputs={file.parent}"],
                                  tmp_path / "predict"))  # fmt: skip
    truth = {str(p): row for p, row in zip(data._all.paths, data._all.labels, strict=True)}
    for record in records:
        labels = {item["label"] for item in record["labels"]}
        cut = dict(zip(model.classes, thresholds, strict=True))
        assert all(item["probability"] >= cut[item["label"]] for item in record["labels"])
        assert {t["class"] for t in record["top"] if t["probability"] >= cut[t["class"]]} <= labels
    right = [
        {c for c, y in zip(model.classes, truth[r["image"]], strict=True) if y}
        == {item["label"] for item in r["labels"]}
        for r in records
    ]
    assert sum(right) >= 0.8 * len(records)  # the colours are easy: most label sets exact
    info = export(command_cfg("export", [f"ckpt_path={ckpt}"], tmp_path / "export"))
    assert info["task"] == "multilabel" and "sigmoid" in info["output"]["meaning"]
    assert list(info["thresholds"].values()) == thresholds
    # the probe's logits reach thousands on these separable colours: parity relative to them,
    # at float32 rounding over a reduction of the features (1.7e-6 seen with Intel's AMX
    # kernels); a wrong export is off by the logits' own size
    largest_logit = info["parity"]["allowed"] / info["parity"]["tolerance"]
    assert info["parity"]["max_abs_diff"] <= 1e-5 * largest_logit

    # eval: the run's own test split, its thresholds, the figures the run reported
    from src.eval import evaluate

    overrides = [f"ckpt_path={ckpt}", "data=table", f"data.root={file}"]
    metrics = evaluate(command_cfg("eval", overrides, tmp_path / "eval"))
    assert metrics["n_images"] == result["n_test"]
    for key in ("mAP", "micro_f1", "macro_f1", "subset_acc", "hamming_loss", "loss"):
        assert metrics[f"test_{key}"] == pytest.approx(result[f"test/{key}"], abs=1e-5), key
    assert [m["label"] for m in metrics["per_label"]] == model.classes
    assert [m["threshold"] for m in metrics["per_label"]] == pytest.approx(thresholds)
    assert sum(m["support"] for m in metrics["per_label"]) == int(
        torch.tensor(data.test_split.labels).sum()
    )
    assert (tmp_path / "eval" / "per_label.png").is_file()
    assert "| blue |" in (tmp_path / "eval" / "report.md").read_text()

    # explain: one Grad-CAM row (310 px at 100 dpi) per label predicted, the top one if none
    from src.explain import explain

    pngs = explain(command_cfg("explain", [f"ckpt_path={ckpt}", f"inputs={file.parent}"],
                               tmp_path / "explain"))  # fmt: skip
    rows = {Path(r["image"]).stem: max(1, len(r["labels"])) for r in records}
    assert max(rows.values()) >= 2
    for png in pngs:
        with Image.open(png) as image:
            assert round(image.height / 310) == rows[png.stem.removesuffix("_gradcam")], png


@pytest.mark.slow
def test_multilabel_recipe_kfold_with_positive_weights(tmp_path: Path, one_thread) -> None:
    """The recipe's epochs with class_weights=auto (pos_weight) over 2 stratified folds."""
    import json

    from src.train import run
    from tests.conftest import compose_cfg

    file = make_label_table(tmp_path / "data", count=32)
    overrides = table_overrides(file, "class_weights=auto", "folds=2", "trainer.max_epochs=1")
    objective = run(compose_cfg(overrides, tmp_path / "run"))
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert objective == result["val/mAP"] and result["folds"] == 2
    folds = [
        json.loads((tmp_path / "run" / f"fold-{k}" / "result.json").read_text()) for k in (0, 1)
    ]
    tests = [set(f["split"]["splits"]["test"].values()) for f in folds]
    assert tests[0] != tests[1]
    assert "test/mAP" in (tmp_path / "run" / "cv.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("freeze", ["true", "false"])  # cached features; images
def test_multilabel_resumed_run_matches_an_uninterrupted_one(
    tmp_path: Path, one_thread, freeze: str, fits
) -> None:
    """A multi-label run killed after its first epoch and resumed from last.ckpt ends where
    the uninterrupted run ends: same metrics, thresholds and weights."""
    import json

    from src.train import train
    from tests.conftest import assert_resumed, compose_cfg
    from tests.test_recovery import TIMINGS

    file = make_label_table(tmp_path / "data", count=32)

    def run(name: str, *extra: str) -> tuple[dict, dict]:
        out = tmp_path / name
        train(compose_cfg(table_overrides(file, f"freeze={freeze}", "optimizer=adam", *extra), out))
        result = json.loads((out / "result.json").read_text())
        last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
        return {k: v for k, v in result.items() if k not in TIMINGS}, last

    straight, straight_last = run("straight", "trainer.max_epochs=2")
    _, first_last = run("killed", "trainer.max_epochs=1")
    saved = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    resumed, resumed_last = run("resumed", "trainer.max_epochs=2", f"ckpt_path={saved}")
    assert_resumed(fits[2], saved, straight=fits[0])
    assert resumed == straight and len(straight["thresholds"]) == 3
    for name, tensor in straight_last["state_dict"].items():
        assert torch.equal(resumed_last["state_dict"][name], tensor), name
    head = "head.weight"
    assert not torch.equal(first_last["state_dict"][head], resumed_last["state_dict"][head])
