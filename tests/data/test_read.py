"""Readers: every file type round-trips rows with their line numbers; every failure is one line naming file and line."""

from __future__ import annotations

import json

import pytest

from qlorakit.data.errors import DataError
from qlorakit.data.read import read_rows

ROWS = [{"instruction": "Say hi", "input": "", "output": "Hi"}, {"instruction": "Add", "input": "1+1", "output": "2"}]


def test_jsonl_skips_blank_lines_and_keeps_line_numbers(write_jsonl):
    path = write_jsonl([ROWS[0], "", "   ", ROWS[1]])
    table = read_rows(path)
    assert table.rows == ROWS
    assert table.lines == [1, 4]
    assert table.where(1) == f"{path}:4"


def test_json_list_and_data_object_give_object_start_lines(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(ROWS, indent=2))
    table = read_rows(listed)
    assert table.rows == ROWS
    assert table.lines == [2, 7]  # each object's opening brace
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": [1, {"x": "]"}], "data": ROWS}, indent=2))
    assert read_rows(wrapped).rows == ROWS


def test_json_file_holding_json_lines_is_read_as_jsonl(tmp_path):
    path = tmp_path / "train.json"
    path.write_text("\n".join(json.dumps(r) for r in ROWS))
    assert read_rows(path).rows == ROWS


def test_csv_and_tsv_with_quoted_newline(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('instruction,input,output\nSay hi,,Hi\n"Add\nthese",1+1,2\n\nLast,,x\n', encoding="utf-8")
    table = read_rows(path)
    assert table.rows[0] == ROWS[0]
    assert table.rows[1] == {"instruction": "Add\nthese", "input": "1+1", "output": "2"}
    assert table.lines == [2, 3, 6]
    tsv = tmp_path / "train.tsv"
    tsv.write_text("prompt\tcompletion\nQ\tA\n")
    assert read_rows(tsv).rows == [{"prompt": "Q", "completion": "A"}]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    table = read_rows(path)
    assert table.rows == ROWS
    assert table.where(1) == f"{path}: row 2"


def test_hub_name_goes_through_datasets(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    table = read_rows("yahma/alpaca-cleaned")
    assert calls == [("yahma/alpaca-cleaned", "train")]
    assert table.rows == ROWS and table.where(0) == "yahma/alpaca-cleaned: row 1"


def test_hub_failure_is_one_line(monkeypatch):
    import datasets

    def fail(name, split):
        raise ConnectionError("offline mode is enabled\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(DataError) as e:
        read_rows("nobody/nothing")
    assert str(e.value) == (
        "nobody/nothing: no such file, and loading it as a Hugging Face Hub dataset failed "
        "(ConnectionError: offline mode is enabled)"
    )


def _error(path) -> str:
    with pytest.raises(DataError) as e:
        read_rows(path)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_bad_json_line_names_line_and_column(write_jsonl):
    path = write_jsonl([ROWS[0], ROWS[1], '{"instruction": "x" "output": "y"}'])
    assert _error(path) == f"{path}:3: invalid JSON (Expecting ',' delimiter at column 21)"


def test_bad_json_file_names_line_and_column(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"a": 1}\n  {"a": 2}\n]')
    assert _error(path) == f"{path}:3: invalid JSON (Expecting ',' delimiter at column 3)"


def test_non_utf8_names_line_byte_and_offset(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    assert _error(path) == f"{path}:2: not valid UTF-8 (byte 0xff at offset 10)"


@pytest.mark.parametrize(
    ("suffix", "content"),
    [(".jsonl", ""), (".jsonl", "\n\n  \n"), (".json", ""), (".json", "[]"), (".json", '{"data": []}'), (".csv", "a,b\n")],
)
def test_empty_file(tmp_path, content, suffix):
    path = tmp_path / f"train{suffix}"
    path.write_text(content)
    assert _error(path) == f"{path}: empty file (no rows)"


def test_missing_file_and_unsupported_suffix(tmp_path):
    assert _error("data/x.jsonl") == "data/x.jsonl: no such file"
    odd = tmp_path / "train.txt"
    odd.write_text("hello")
    assert "unsupported file type '.txt'" in _error(odd)


def test_row_that_is_not_an_object(write_jsonl):
    path = write_jsonl([ROWS[0], "[1, 2]"])
    assert _error(path) == f"{path}:2: row is a JSON list, expected an object with named fields"


def test_csv_row_with_too_many_fields(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("prompt,completion\nQ,A\nQ,A,extra\n")
    assert _error(path) == f"{path}:3: row has 3 fields, the header has 2"
