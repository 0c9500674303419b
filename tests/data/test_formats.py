"""Format detection, normalisation and row validation errors (file, line, field)."""

from __future__ import annotations

import pytest

from qlorakit.data.errors import DataError
from qlorakit.data.formats import resolve_format, validate_rows
from qlorakit.data.read import Table, read_rows


def table(*rows) -> Table:
    return Table("data/train.jsonl", list(rows), list(range(1, len(rows) + 1)))


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"instruction": "i", "output": "o"}, "alpaca"),
        ({"instruction": "i", "input": "x", "output": "o"}, "alpaca"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "chat"),
        ({"conversations": [{"from": "human", "value": "hi"}]}, "chat"),
        ({"prompt": "p", "completion": "c"}, "prompt-completion"),
        ({"question": "q", "answer": "a"}, "prompt-completion"),
        ({"text": "t", "meta": 1}, "text"),
    ],
)
def test_detect(row, expected):
    assert resolve_format(table(row, row)) == expected


def test_override_wins_and_unknown_override_is_refused():
    assert resolve_format(table({"text": "t"}), "prompt-completion") == "prompt-completion"
    with pytest.raises(DataError, match=r"^data.format: unknown format 'sharegpt'"):
        resolve_format(table({"text": "t"}), "sharegpt")


def test_undetectable_and_mixed_rows_are_errors():
    with pytest.raises(DataError, match=r"^data/train.jsonl:1: cannot tell the data format from the keys \('a', 'b'\)"):
        resolve_format(table({"a": 1, "b": 2}))
    with pytest.raises(DataError, match=r"^data/train.jsonl:2: row looks like text but data/train.jsonl:1 looks like alpaca"):
        resolve_format(table({"instruction": "i", "output": "o"}, {"text": "t"}))


def test_normalised_rows():
    rows = validate_rows(table({"instruction": "i", "output": "o", "extra": 3}, {"instruction": "i", "input": None, "output": "o"}), "alpaca")
    assert rows == [{"instruction": "i", "input": "", "output": "o"}] * 2
    assert validate_rows(table({"question": "q", "answer": "a"}), "prompt-completion") == [{"prompt": "q", "completion": "a"}]
    sharegpt = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}]}
    assert validate_rows(table(sharegpt), "chat") == [
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "h"}, {"role": "assistant", "content": "g"}]}
    ]


def _error(rows, fmt) -> str:
    with pytest.raises(DataError) as e:
        validate_rows(table(*rows), fmt)
    return str(e.value)


def test_missing_field_names_file_line_and_field(write_jsonl):
    good = {"instruction": "i", "input": "", "output": "o"}
    path = write_jsonl([good, good, good, {"instruction": "i"}])
    t = read_rows(path)
    with pytest.raises(DataError) as e:
        validate_rows(t, resolve_format(t))
    assert str(e.value) == f"{path}:4: field 'output' is missing"


def test_wrong_types():
    assert _error([{"text": 3}], "text") == "data/train.jsonl:1: field 'text' must be a string, got int"
    bad_turn = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]}
    assert _error([bad_turn], "chat") == "data/train.jsonl:1: field 'messages'[1].content must be a string, got int"
    assert _error([{"messages": "hi"}], "chat") == "data/train.jsonl:1: field 'messages' must be a list of messages, got str"
    assert _error([{"messages": []}], "chat") == "data/train.jsonl:1: field 'messages' is an empty list"
    assert _error([{"messages": [{"content": "x"}]}], "chat") == "data/train.jsonl:1: field 'messages'[0].role is missing"
    sharegpt = {"conversations": [{"from": "alien", "value": "x"}]}
    assert _error([sharegpt], "chat").startswith("data/train.jsonl:1: field 'conversations'[0].from is 'alien'; expected one of")
    assert _error([{"prompt": "p", "completion": ["c"]}], "prompt-completion") == (
        "data/train.jsonl:1: field 'completion' must be a string, got list"
    )
