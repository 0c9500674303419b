"""The data readers raise DataError and nothing else, whatever bytes a file holds."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlorakit.data.dataset import build_datasets
from qlorakit.data.errors import DataError
from qlorakit.data.formats import resolve_format, validate_rows
from qlorakit.data.read import read_rows

SUFFIXES = [".jsonl", ".json", ".csv", ".tsv", ".ndjson"]
FUZZ = settings(max_examples=80, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELD_NAMES = ["instruction", "input", "output", "messages", "conversations", "role", "content", "from", "value",
               "prompt", "completion", "question", "answer", "text", "data"]
# rows that look almost like real rows: the known keys with random values, nested messages included
plausible_rows = st.dictionaries(
    st.sampled_from(FIELD_NAMES),
    json_values | st.lists(st.dictionaries(st.sampled_from(["role", "content", "from", "value"]), json_values, max_size=3), max_size=3),
    max_size=4,
)


def _read_and_validate(path: Path) -> None:
    """read → detect format → validate: must succeed or raise DataError."""
    try:
        table = read_rows(path)
        validate_rows(table, resolve_format(table, "auto"))
    except DataError as error:
        message = str(error)
        assert message and "\n" not in message.strip(), repr(message)
        assert str(path) in message or message.startswith("data."), message


_SCRATCH = tempfile.TemporaryDirectory(prefix="qlk-fuzz-")  # one file per suffix, rewritten by each example


def _write(data: bytes, suffix: str) -> Path:
    path = Path(_SCRATCH.name) / f"rows{suffix}"
    path.write_bytes(data)
    return path


@FUZZ
@given(data=st.binary(max_size=300), suffix=st.sampled_from(SUFFIXES))
def test_random_bytes(data, suffix):
    _read_and_validate(_write(data, suffix))


@FUZZ
@given(text=st.text(alphabet=st.sampled_from('{}[]",:\n\r\t \\0123456789abcdeflnrstu\x00\ufeffé'), max_size=200),
       suffix=st.sampled_from(SUFFIXES))
def test_json_like_text(text, suffix):
    _read_and_validate(_write(text.encode("utf-8", "surrogatepass"), suffix))


@FUZZ
@given(value=json_values | st.lists(plausible_rows, max_size=5) | st.fixed_dictionaries({"data": st.lists(plausible_rows, max_size=4)}))
def test_random_json_document(value):
    _read_and_validate(_write(json.dumps(value, indent=1).encode(), ".json"))


@FUZZ
@given(lines=st.lists(plausible_rows | json_values, min_size=0, max_size=6))
def test_random_jsonl_rows(lines):
    _read_and_validate(_write("".join(json.dumps(v) + "\n" for v in lines).encode(), ".jsonl"))


@FUZZ
@given(rows=st.lists(st.lists(st.text(max_size=8), min_size=0, max_size=5), max_size=6), delimiter=st.sampled_from([",", "\t"]))
def test_random_csv(rows, delimiter):
    buffer = io.StringIO()
    csv.writer(buffer, delimiter=delimiter).writerows(rows)
    _read_and_validate(_write(buffer.getvalue().encode(), ".csv" if delimiter == "," else ".tsv"))


@pytest.fixture(scope="module")
def tokenizer():
    from qlorakit.models.load import load_tokenizer

    return load_tokenizer("smollm2")


@settings(max_examples=50, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(lines=st.lists(plausible_rows, min_size=1, max_size=4), packing=st.booleans(),
       train_on_prompt=st.booleans(), max_length=st.integers(1, 40))
def test_build_datasets_only_raises_data_error(tokenizer, lines, packing, train_on_prompt, max_length):
    """The whole pipeline (template, tokenize, mask, pack) on near-valid rows."""
    path = _write("".join(json.dumps(v) + "\n" for v in lines).encode(), ".jsonl")
    try:
        train, _, _ = build_datasets(path, tokenizer, max_length=max_length, packing=packing, train_on_prompt=train_on_prompt)
    except DataError as error:
        assert "\n" not in str(error).strip()
    else:
        assert train
