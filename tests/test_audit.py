"""The data audit (src.quality, src.audit) and data.exclude."""

import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from PIL import Image
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

import src.quality.findings
from src.audit import audit, label_layers
from src.data.module import ImageFolderData
from src.quality.duplicates import CopyRules, find_copies
from src.quality.hashes import fingerprints
from src.quality.label_issues import label_issues, neighbour_votes
from src.quality.leaks import warn_if_leaks
from src.quality.neighbours import nearest
from src.quality.outliers import outliers
from src.run.errors import UserError
from tests.conftest import CONF_DIR, calibrated_mobilenet_v2, make_folder

TINY = ["image_size=32", "precision=32-true"]  # a calibrated random MobileNetV2's settings


def smooth_folder(root: Path, per_class: int = 6, test: int = 3) -> Path:
    """3 classes of distinct smooth random images (6 x 6 noise upscaled to 32 px, RGB)."""
    rng = np.random.default_rng(0)
    for top, count in (("training", per_class), ("validation", test)):
        for c in range(3):
            folder = root / top / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
                image = Image.fromarray(small).resize((32, 32), Image.Resampling.BICUBIC)
                image.save(folder / f"image{i}.png")
    return root


def audit_cfg(tmp_path: Path, overrides: list[str]) -> DictConfig:
    """conf/audit.yaml with `overrides`, its run dir (made), caches and scan under tmp_path."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("audit", overrides)
    with open_dict(cfg):
        cfg.output_dir, cfg.cache_dir = str(tmp_path / "out"), str(tmp_path / "cache")
        cfg.data.scan_cache = str(tmp_path / "scan")
    (tmp_path / "out").mkdir(exist_ok=True)
    return cfg


def test_planted_label_errors_rank_above_clean_ones(one_thread):
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=generator) * 3
    labels = torch.arange(3).repeat_interleave(40)
    features = centres[labels] + torch.randn(120, 16, generator=generator)
    noisy = labels.clone()
    planted = [0, 41, 82, 5, 46, 87]
    for i in planted:
        noisy[i] = (labels[i] + 1) % 3
    found, agreement = label_issues(features, noisy, 3, folds=5, l2=1.0, seed=0)
    ranked = [i for i, _, _ in found]
    assert agreement == pytest.approx(1 - len(planted) / 120, abs=0.03)
    assert sorted(ranked[: len(planted)]) == sorted(planted)
    assert all(suggested == (int(labels[i]),) for i, suggested, _ in found[: len(planted)])


def test_a_larger_frac_noise_lists_more_of_the_doubted_images(one_thread):
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(40)
    features = torch.randn(3, 16, generator=generator)[labels] + torch.randn(
        120, 16, generator=generator
    )
    noisy = labels.clone()
    noisy[[0, 41, 82]] = (labels[[0, 41, 82]] + 1) % 3
    listed = {
        frac: [i for i, _, _ in label_issues(features, noisy, 3, l2=1.0, frac_noise=frac)[0]]
        for frac in (1.0, 2.0)
    }
    assert set(listed[1.0]) < set(listed[2.0])


def test_planted_multilabel_errors_rank_above_clean_ones(one_thread, caplog):
    generator = torch.Generator().manual_seed(1)
    truth = (torch.rand(150, 4, generator=generator) < 0.4).float()
    truth[:, 3] = 0
    truth[0, 3] = 1  # a label on one image only: too rare for two folds, left out
    features = truth @ (torch.randn(4, 16, generator=generator) * 3)
    features += 1.5 * torch.randn(150, 16, generator=generator)
    noisy = truth.clone()
    planted = [3, 50, 97, 120]
    for i in planted:
        noisy[i, i % 3] = 1 - noisy[i, i % 3]
    found, agreement = label_issues(features, noisy, 4, l2=0.1)
    assert sorted(i for i, _, _ in found[: len(planted)]) == planted
    assert all(suggested == tuple(truth[i, :3].nonzero().flatten().tolist())
               for i, suggested, _ in found[: len(planted)])  # fmt: skip
    assert 0.9 < agreement < 1
    assert "skips labels [3]" in caplog.text


def test_neighbour_votes_are_a_leave_one_out_knn_on_standardised_features():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(40, 8, generator=generator) * torch.arange(1, 9)  # scales differ
    labels = torch.arange(4).repeat(10)
    z = StandardScaler().fit_transform(features.double().numpy())
    ids = NearestNeighbors(n_neighbors=6, metric="cosine").fit(z).kneighbors(z)[1][:, 1:]
    expected = np.stack([(labels.numpy()[ids] == c).mean(1) for c in range(4)], 1)
    np.testing.assert_array_equal(neighbour_votes(features, labels, 4, k=5), expected)


def test_a_small_class_fills_its_own_neighbour_votes():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(33, 8, generator=generator)
    features[30:] = 10 + 0.1 * torch.randn(3, 8, generator=generator)  # a class of 3, apart
    labels = torch.tensor([0, 1] * 15 + [2] * 3)
    votes = neighbour_votes(features, labels, 3, k=10)
    assert votes[30:, 2].tolist() == [1.0, 1.0, 1.0]  # k = 2: not 2 of 10 for being small


def test_exact_and_resized_reencoded_test_copies_are_leaks(tmp_path):
    root = smooth_folder(tmp_path / "data")
    exact = root / "training" / "class_0" / "copy.png"
    shutil.copy(root / "validation" / "class_0" / "image0.png", exact)
    with Image.open(root / "validation" / "class_1" / "image1.png") as image:
        image.resize((56, 56), Image.Resampling.LANCZOS).save(
            root / "training" / "class_1" / "copy.jpg", "JPEG", quality=85
        )
    data = ImageFolderData(str(root), image_size=32, val_fraction=0.2, seed=0)
    paths = data.train_split.paths + data.val_split.paths + data.test_split.paths
    splits = ["train"] * len(data.train_split.paths) + ["val"] * len(data.val_split.paths)
    splits += ["test"] * len(data.test_split.paths)
    digests, thumbs = fingerprints(paths, tmp_path / "hashes.json")
    features = torch.eye(len(paths))  # features that see no copy: the pixels must
    copies = find_copies(digests, thumbs, nearest(features, 3), splits, CopyRules())
    names = {(paths[a].name, paths[b].name, kind) for a, b, kind, _ in copies}
    assert len(copies) == 2 and all("test" in (splits[a], splits[b]) for a, b, _, _ in copies)
    assert {("copy.png", "image0.png", "exact"), ("copy.jpg", "image1.png", "near")} <= {
        (*sorted((x, y)), kind) for x, y, kind in names
    }
    assert warn_if_leaks(data, tmp_path / "scan") == 2


def test_image_from_another_distribution_ranks_first_among_outliers():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(60, 32, generator=generator) * 0.2 + torch.ones(32)
    features[17] = torch.randn(32, generator=generator)  # unlike the rest
    ranked = outliers(nearest(features, 5)[0], min_z=3.0)
    assert ranked[0][0] == 17 and len(ranked) <= 3


def test_exclude_removes_exactly_the_listed_files_and_changes_the_record(tmp_path):
    root = make_folder(tmp_path / "data", per_class=8, validation=4)
    before = ImageFolderData(str(root), image_size=16, seed=0)
    listed = [before.train_split.paths[0], before.test_split.paths[1]]
    exclude = tmp_path / "exclude.csv"
    rows = [p.relative_to(root).as_posix() + ",x" for p in listed]
    exclude.write_text("path,split\n" + "\n".join(rows) + "\n")
    after = ImageFolderData(str(root), image_size=16, seed=0, exclude=str(exclude))
    for name, split in before.splits().items():
        kept = [p for p in split.paths if p not in listed]
        assert after.splits()[name].paths == kept
    record = after.split_record()
    assert record["exclude"]["count"] == 2 and "exclude" not in before.split_record()
    assert record["splits"]["train"] != before.split_record()["splits"]["train"]
    with pytest.raises(UserError, match="not the one of the training run"):
        before.check_split(record)


@pytest.mark.parametrize("content", [None, "training/class_0/nope.png\n"])
def test_bad_exclude_file_is_one_line(tmp_path, content):
    root = make_folder(tmp_path / "data", per_class=4)
    exclude = tmp_path / "exclude.txt"
    if content is not None:
        exclude.write_text(content)
    with pytest.raises(UserError) as err:
        ImageFolderData(str(root), image_size=16, seed=0, exclude=str(exclude))
    assert "\n" not in str(err.value) and "Fix:" in str(err.value)


class Page(HTMLParser):
    """Checks that tags nest and collects the embedded images."""

    VOID = {"meta", "img", "br"}

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.open.pop() == tag


def test_audit_writes_csvs_and_a_valid_page_embedding_every_listed_image(
    tmp_path, one_thread, monkeypatch
):
    probed = []

    def recording(features, *args, **kwargs):
        probed.append((features.shape, args[2:]))
        return label_issues(features, *args, **kwargs)

    monkeypatch.setattr(src.quality.findings, "label_issues", recording)
    root = smooth_folder(tmp_path / "data", per_class=8, test=4)
    shutil.copy(root / "validation/class_2/image0.png", root / "training/class_2/leak.png")
    weights = calibrated_mobilenet_v2(root, tmp_path / "calibrated.pth")
    cfg = audit_cfg(
        tmp_path,
        [f"backbone.weights={weights}", "data=imagefolder", f"data.root={root}", *TINY]
        + ["audit.folds=3", "audit.label_neighbours=4", "audit.frac_noise=1.5"],
    )
    findings = audit(cfg)
    out = tmp_path / "out"
    # every image, MobileNetV2's stages; folds, l2, k-NN, frac_noise and seed as set
    assert probed == [((3 * 8 + 3 * 4 + 1, 24 + 32 + 96), (3, 0.3, 4, 1.5, 42))]
    assert findings.leaks()[0]["kind"] == "exact"
    for name in ("label_issues", "duplicates", "outliers"):
        assert (out / f"{name}.csv").read_text().startswith(("path,", "path_a,"))
    page = Page()
    page.feed((out / "report.html").read_text())
    assert page.open == []
    listed = len(findings.rows["label_issues"]) + len(findings.rows["outliers"])
    listed += 2 * len(findings.rows["duplicates"])
    assert len(page.images) == listed > 0
    assert all(src.startswith("data:image/jpeg;base64,") for src in page.images)
    report = (out / "report.md").read_text()
    assert "| leaks (copies across train/val and test) | 1 |" in report
    assert "label_layers=['features.3', 'features.6', 'features.13']" in report  # stated


def test_audit_of_a_multilabel_table_lists_labels_by_name(tmp_path, one_thread):
    root = smooth_folder(tmp_path / "data", per_class=8, test=0)
    weights = calibrated_mobilenet_v2(root, tmp_path / "calibrated.pth")
    rows = ["path,labels"]
    for i, path in enumerate(sorted(root.glob("training/*/*.png"))):
        rows.append(f"{path},{path.parent.name}{' spotted' * (i % 2)}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    table = ["data=table", f"data.root={root / 'labels.csv'}"]
    cfg = audit_cfg(tmp_path, [f"backbone.weights={weights}", *table, *TINY, "audit.folds=2"])
    findings = audit(cfg)
    names = {"class_0", "class_1", "class_2", "spotted"}
    assert findings.rows["label_issues"]  # "spotted" is noise: the probes doubt it
    for row in findings.rows["label_issues"]:
        assert set(row["given"].split(";")) <= names  # an empty suggestion: no label
        assert {name for name in row["suggested"].split(";") if name} <= names
    assert 0 < findings.label_agreement < 1
    assert "| label agreement (" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize(
    "override, wanted",
    [
        ("audit.frac_noise=abc", "a number above 0. Fix: e.g. audit.frac_noise=1.25"),
        ("audit.l2=-1", "a number above 0. Fix: e.g. audit.l2=0.3"),
        ("audit.folds=1", "a whole number, at least 2. Fix: e.g. audit.folds=5"),
        (
            "audit.label_neighbours=2.5",
            "a whole number, at least 1. Fix: e.g. audit.label_neighbours=10",
        ),
    ],
)
def test_a_bad_audit_number_is_one_line_before_any_extraction(tmp_path, override, wanted):
    root = smooth_folder(tmp_path / "data")
    cfg = audit_cfg(tmp_path, ["data=imagefolder", f"data.root={root}", override])
    with pytest.raises(
        UserError, match=rf"^{re.escape(f'{override} is invalid: it must be {wanted}')}$"
    ):
        audit(cfg)
    assert not (tmp_path / "cache").exists()


def test_unknown_label_features_setting_is_one_line():
    with pytest.raises(UserError, match=r"audit.label_features=logits .*Fix: "):
        label_layers(None, "logits")
