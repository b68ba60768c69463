"""Data layouts: tables of images (CSV/TSV/JSONL), class folders, train/val/test folders."""

import json
import logging
import shutil
from pathlib import Path

import pytest

from src.data.layouts import detect_layout
from src.data.module import ImageFolderData
from src.data.table import check_files, read_table
from src.run.errors import UserError
from tests.conftest import make_folder


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_csv_paths_relative_to_the_file_or_absolute_other_columns_ignored(tmp_path: Path) -> None:
    absolute = tmp_path / "elsewhere" / "b.png"
    table = read_table(
        write(
            tmp_path / "data" / "labels.csv",
            f"id,filename,label,notes\n1,img/a.png,cat,x\n2,{absolute},dog,\n",
        )
    )
    assert table.paths == [tmp_path / "data" / "img" / "a.png", absolute]
    assert table.labels == ["cat", "dog"]
    assert table.splits is None
    assert table.lines == [2, 3]
    assert table.columns == {"path": "filename", "label": "label"}


def test_tsv_and_jsonl_with_split_column(tmp_path: Path) -> None:
    tsv = read_table(
        write(tmp_path / "t.tsv", "path\tclass\tsplit\na.png\tx\tTrain\nb.png\ty\tvalid\n")
    )
    assert (tsv.labels, tsv.splits) == (["x", "y"], ["train", "val"])
    rows = [{"image": "a.png", "label": "x a", "split": "test"}, {"image": "b.png", "label": 3}]
    rows[1]["split"] = "train"
    jsonl = read_table(write(tmp_path / "t.jsonl", "\n".join(map(json.dumps, rows)) + "\n"))
    assert (jsonl.labels, jsonl.splits, jsonl.lines) == (["x a", "3"], ["test", "train"], [1, 2])


def test_columns_set_by_name(tmp_path: Path) -> None:
    file = write(tmp_path / "t.csv", "a,b,label\nx.png,cat,dog\n")
    table = read_table(file, path_column="a", label_column="b")
    assert (table.paths, table.labels) == ([tmp_path / "x.png"], ["cat"])
    with pytest.raises(
        UserError, match=r"no column 'c' \(its columns: a, b, label\).*label_column"
    ):
        read_table(file, label_column="c")


def test_the_bytes_hash_changes_with_an_edit(tmp_path: Path) -> None:
    file = write(tmp_path / "t.csv", "path,label\nx.png,cat\n")
    before = read_table(file).sha256
    write(file, "path,label\nx.png,dog\n")
    assert read_table(file).sha256 != before


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name,tag\nx.png,cat\n", r"no path column \(its columns: name, tag.*data.path_column"),
        ("path,tag\nx.png,cat\n", r"no label column .*data.label_column"),
        ("path,label\nx.png,cat\ny.png,\nz.png, \n", r"empty label cell .* line\(s\) 3, 4 of"),
        ("path,label\nx.png,cat\n,dog\n", r"empty path cell .* line\(s\) 3 of"),
        ("path,label\nx.png,cat\ny.png,dog\n./x.png,dog\n", r"listed a second time on line\(s\) 4"),
        (
            "path,label,split\nx.png,cat,train\ny.png,dog,holdout\n",
            r"not train/val/test on line\(s\) 3",
        ),
        ("path,label\n", r"no rows"),
    ],
)
def test_bad_tables_are_one_line_naming_the_lines(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(UserError, match=message) as err:
        read_table(write(tmp_path / "t.csv", text))
    assert "\n" not in str(err.value)


def test_bad_json_line_is_named(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"line 2 of .* is not JSON"):
        read_table(write(tmp_path / "t.jsonl", '{"path": "a.png", "label": "x"}\n{oops\n'))


def test_missing_files_named_or_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_folder(tmp_path, per_class=1)
    file = write(
        tmp_path / "t.csv",
        "path,label\ntraining/class_0/image0.png,a\nnope.png,b\ntraining/class_1/image0.png,b\n",
    )
    with pytest.raises(
        UserError, match=r"missing image file on line\(s\) 3 of .*on_bad_image=skip"
    ):
        check_files(read_table(file))
    kept = check_files(read_table(file), "skip")
    assert (kept.labels, kept.lines) == (["a", "b"], [2, 4])
    assert "line(s) 3" in caplog.text


# --- layouts: the same images as published, splits, classes and a table ---------------------


def as_splits(published: Path, root: Path, val: bool = False) -> Path:
    """The images of a published folder as train/ (+ test/ from validation/, + val/ from the
    first two training images of each class when `val`)."""
    shutil.copytree(published / "training", root / "train")
    if (published / "validation").is_dir():
        shutil.copytree(published / "validation", root / "test")
    if val:
        for folder in sorted((root / "train").iterdir()):
            (root / "val" / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:2]:
                image.rename(root / "val" / folder.name / image.name)
    return root


def as_classes(published: Path, root: Path) -> Path:
    """The training images of a published folder as one folder per class."""
    shutil.copytree(published / "training", root)
    return root


def as_table(published: Path, name: str = "labels.csv", split: bool = False) -> Path:
    """A table beside the published folder's images, its rows in reverse (any order will do):
    training/ rows are train, validation/ rows test (with `split`; else no split column)."""
    rows = []
    for top, role in (("training", "train"), ("validation", "test")):
        for image in sorted((published / top).glob("*/*.png")):
            if role == "test" and not split:
                continue
            cells = [image.relative_to(published).as_posix(), image.parent.name]
            rows.append(",".join(cells + ([role] if split else [])))
    header = "filename,label" + (",split" if split else "")
    return write(published / name, "\n".join([header, *reversed(rows)]) + "\n")


def by_name(data: ImageFolderData) -> dict[str, list[tuple[str, str]]]:
    """Each split as (class, file name) pairs, in order: comparable across layouts."""
    return {
        name: [(data.classes[y], p.name) for p, y in zip(s.paths, s.labels, strict=True)]
        for name, s in data.splits().items()
    }


def module(root: Path, **kwargs) -> ImageFolderData:
    return ImageFolderData(str(root), image_size=24, batch_size=4, **kwargs)


def test_layouts_detected(tmp_path: Path) -> None:
    published = make_folder(tmp_path / "pub", per_class=3, validation=1)
    assert detect_layout(published) == "published"
    assert detect_layout(as_splits(published, tmp_path / "splits")) == "splits"
    assert detect_layout(as_classes(published, tmp_path / "classes")) == "classes"
    assert detect_layout(as_table(published)) == "table"


@pytest.mark.parametrize(
    ("folders", "message"),
    [
        (["training/a", "train/a"], r"both training/ .* and train/ .*data.layout=published or"),
        (["test/a", "val/a"], r"holds test/, val/ but no train/ .*data.layout=classes"),
        ([], r"^no training folder .*/training\. Fix: .*class; or a table"),
    ],
)
def test_ambiguous_or_empty_roots_are_one_line(tmp_path: Path, folders, message) -> None:
    for folder in folders:
        (tmp_path / "r" / folder).mkdir(parents=True)
    (tmp_path / "r").mkdir(exist_ok=True)
    with pytest.raises(UserError, match=message):
        module(tmp_path / "r")


def test_two_names_for_one_split_is_one_line(tmp_path: Path) -> None:
    root = as_splits(make_folder(tmp_path / "pub", per_class=3), tmp_path / "s")
    for alias in ("val", "valid"):
        shutil.copytree(root / "train", root / alias)
    with pytest.raises(UserError, match=r"holds val/ and valid/: which is the val split"):
        module(root)


def test_same_images_give_the_same_split_in_every_layout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    published = make_folder(tmp_path / "pub", per_class=10)
    with caplog.at_level(logging.INFO, logger="src.data"):
        reference = by_name(module(published))
        assert by_name(module(as_classes(published, tmp_path / "classes"))) == reference
        assert by_name(module(as_splits(published, tmp_path / "splits"))) == reference
        assert by_name(module(as_table(published))) == reference
    assert "data layout classes in" in caplog.text
    assert "train = labels.csv (less the splits carved from it); val = 0.1 of labels.csv" in (
        caplog.text
    )
    assert len(reference["test"]) == 3 and len(reference["val"]) == 3


def test_given_test_split_in_every_layout(tmp_path: Path) -> None:
    published = make_folder(tmp_path / "pub", per_class=6, validation=2)
    reference = by_name(module(published))
    splits = module(as_splits(published, tmp_path / "splits"))
    table = module(as_table(published, split=True))
    for data in (splits, table):
        assert by_name(data) == reference
        assert data.test_given and not data.test_is_val
    assert [p.parent.parent.name for p in splits.test_split.paths] == ["test"] * 6
    assert splits.test_source == "test/" and table.test_source == "the test rows of labels.csv"


def test_roles_val_chooses_test_only_tests(tmp_path: Path) -> None:
    root = as_splits(make_folder(tmp_path / "pub", per_class=6, validation=2), tmp_path / "s", True)
    data = module(root)
    tops = {name: {p.parent.parent.name for p in s.paths} for name, s in data.splits().items()}
    assert tops == {"train": {"train"}, "val": {"val"}, "test": {"test"}}
    assert len(data.train_split.paths) == 12 and len(data.val_split.paths) == 6


def test_a_missing_test_split_is_carved_from_train(tmp_path: Path) -> None:
    root = as_splits(make_folder(tmp_path / "pub", per_class=10), tmp_path / "s", val=True)
    data = module(root)
    assert {p.parent.parent.name for p in data.test_split.paths} == {"train"}
    assert len(data.test_split.paths) == 3  # 0.1 of each class's 8, at least one
    assert not set(data.test_split.paths) & set(data.train_split.paths)


def test_table_split_column_is_obeyed(tmp_path: Path) -> None:
    published = make_folder(tmp_path / "pub", per_class=4)
    images = sorted(published.glob("training/*/*.png"))
    roles = ["train", "train", "val", "test"] * 3
    file = write(
        published / "t.csv",
        "path,label,split\n"
        + "".join(
            f"{p.relative_to(published)},{p.parent.name},{r}\n"
            for p, r in zip(images, roles, strict=True)
        ),
    )
    data = module(file)
    for name in ("train", "val", "test"):
        want = {p for p, r in zip(images, roles, strict=True) if r == name}
        assert set(data.splits()[name].paths) == want
    record = data.split_record()
    assert record["layout"] == "table" and len(record["table_sha256"]) == 64


def test_k_fold_over_a_table_and_a_class_layout(tmp_path: Path) -> None:
    published = make_folder(tmp_path / "pub", per_class=6)
    for fold in range(3):
        reference = by_name(module(published, folds=3, fold=fold))
        assert by_name(module(as_table(published, f"t{fold}.csv"), folds=3, fold=fold)) == reference


def test_folds_with_a_given_val_split_is_one_line(tmp_path: Path) -> None:
    root = as_splits(make_folder(tmp_path / "pub", per_class=6), tmp_path / "s", val=True)
    with pytest.raises(UserError, match=r"data.folds=3 carves the val split .*data.folds=null"):
        module(root, folds=3)


def test_edited_table_is_noticed_by_the_record(tmp_path: Path) -> None:
    published = make_folder(tmp_path / "pub", per_class=5)
    file = as_table(published)
    record = module(file).split_record()
    module(file).check_split(record)  # unchanged: the same split
    write(file, file.read_text().replace("filename,label", "filename,label,note", 1))
    with pytest.raises(UserError, match=r"the table .*labels.csv is not the one of the training"):
        module(file).check_split(record)


def test_published_record_has_no_new_keys(tmp_path: Path) -> None:
    record = module(make_folder(tmp_path / "pub", per_class=3)).split_record()
    assert set(record) == {"seed", "val_fraction", "test_fraction", "folds", "fold", "test_is_val",
                           "splits"}  # fmt: skip


# --- every check for every layout -------------------------------------------------------------


def test_class_only_in_test_rows_or_folder(tmp_path: Path) -> None:
    published = make_folder(tmp_path / "pub", per_class=3, validation=1)
    file = as_table(published, split=True)
    row = "validation/class_0/image0.png,{},test\n"
    write(file, file.read_text().replace(row.format("class_0"), row.format("ghost")))
    with pytest.raises(UserError, match=r"class\(es\) ghost with no train row on line\(s\) \d+"):
        module(file)
    root = as_splits(published, tmp_path / "s")
    shutil.copytree(root / "test" / "class_0", root / "test" / "ghost")
    with pytest.raises(UserError, match=r"test has classes that .*train lacks: ghost"):
        module(root)


def test_given_split_lacking_a_class(tmp_path: Path) -> None:
    root = as_splits(make_folder(tmp_path / "pub", per_class=3, validation=1), tmp_path / "s")
    shutil.rmtree(root / "test" / "class_2")
    with pytest.raises(UserError, match=r"no images in .*test/class_2: the test set \(test/\)"):
        module(root)


def test_single_image_class_in_a_table_is_named(tmp_path: Path) -> None:
    published = make_folder(tmp_path / "pub", per_class=4)
    file = as_table(published)
    lines = [line for line in file.read_text().splitlines() if "class_2/image" not in line]
    write(file, "\n".join([*lines, "training/class_2/image0.png,class_2"]) + "\n")
    with pytest.raises(UserError, match=r"class\(es\) class_2 \(1 image\(s\)\) without an image"):
        module(file)


def test_unreadable_image_in_a_table_named_or_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    published = make_folder(tmp_path / "pub", per_class=5)
    (published / "training" / "class_1" / "image3.png").write_bytes(b"not a png")
    file = as_table(published)
    with pytest.raises(UserError, match=r"1 unreadable image\(s\) in .*class_1/image3.png"):
        module(file)
    data = module(file, on_bad_image="skip")
    assert len(data.all_images()) == 14
    assert "skipping" in caplog.text


def test_absolute_paths_outside_the_table_folder(tmp_path: Path) -> None:
    published = make_folder(tmp_path / "pub", per_class=5)
    rows = [f"{p},{p.parent.name}" for p in sorted(published.glob("training/*/*.png"))]
    file = write(tmp_path / "elsewhere" / "t.tsv", "")
    write(file, "path\tlabel\n" + "\n".join(r.replace(",", "\t") for r in rows) + "\n")
    data = module(file, scan_cache=str(tmp_path / "scan"))
    assert len(data.all_images()) == 15
    assert data.split_record()["splits"]["train"]["count"] == 9


def test_forced_layout_and_bad_layout(tmp_path: Path) -> None:
    published = make_folder(tmp_path / "pub", per_class=3)
    with pytest.raises(UserError, match=r"pub has 1 class folder\(s\) \['training'\]"):
        module(published, layout="classes")  # training/ is then the one class folder
    with pytest.raises(UserError, match=r"data.layout=nested is unknown. Fix: data.layout=auto"):
        module(published, layout="nested")
