"""Data layouts: tables of images (CSV/TSV/JSONL), class folders, train/val/test folders."""

import json
from pathlib import Path

import pytest

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
