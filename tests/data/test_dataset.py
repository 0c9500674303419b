"""build_datasets end to end: determinism, limit + shuffle, validation split, packing, report."""

from __future__ import annotations

import random

import pytest

from qlorakit.data.dataset import build_datasets
from qlorakit.data.errors import DataError
from qlorakit.data.tokenize import IGNORE_INDEX

N = 20


@pytest.fixture
def alpaca_file(write_jsonl):
    rows = [{"instruction": f"Repeat the number {i}.", "input": "", "output": f"number {i}"} for i in range(N)]
    return write_jsonl(rows)


def answer_of(tokenizer, example) -> int:
    """Which row an example came from, read back from its trainable tokens ("number 7<|im_end|>")."""
    text = tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX], skip_special_tokens=True)
    return int(text.split()[-1])


def test_deterministic_for_a_seed(tokenizer, alpaca_file):
    a = build_datasets(alpaca_file, tokenizer, val_fraction=0.2, shuffle_seed=5)
    b = build_datasets(alpaca_file, tokenizer, val_fraction=0.2, shuffle_seed=5)
    assert a == b
    c = build_datasets(alpaca_file, tokenizer, val_fraction=0.2, shuffle_seed=6)
    assert a[0] != c[0]


def test_limit_takes_the_first_rows_of_the_seeded_shuffle(tokenizer, alpaca_file):
    train, val, report = build_datasets(alpaca_file, tokenizer, limit=5, shuffle_seed=42)
    order = list(range(N))
    random.Random(42).shuffle(order)
    assert [answer_of(tokenizer, e) for e in train] == order[:5]
    assert val == [] and report.val is None
    assert (report.format, report.template, report.rows_read, report.train_rows) == ("alpaca", "alpaca", N, 5)
    train, _, _ = build_datasets(alpaca_file, tokenizer, limit=100, shuffle_seed=None)
    assert [answer_of(tokenizer, e) for e in train] == list(range(N))


@pytest.mark.parametrize(
    ("rows", "fraction", "expected"), [(20, 0.25, (15, 5)), (20, 0.01, (19, 1)), (2, 0.9, (1, 1)), (1, 0.5, (1, 0)), (20, 0.0, (20, 0))]
)
def test_val_split_sizes(tokenizer, alpaca_file, rows, fraction, expected):
    train, val, report = build_datasets(alpaca_file, tokenizer, limit=rows, val_fraction=fraction)
    assert (len(train), len(val)) == (report.train_rows, report.val_rows) == expected
    assert not {answer_of(tokenizer, e) for e in train} & {answer_of(tokenizer, e) for e in val}


def test_packing(tokenizer, alpaca_file):
    plain, _, plain_report = build_datasets(alpaca_file, tokenizer)
    packed, _, report = build_datasets(alpaca_file, tokenizer, packing=True, max_length=128)
    assert report.packed_train == len(packed) < len(plain)
    assert all(len(p["input_ids"]) <= 128 for p in packed)
    assert sum(len(p["input_ids"]) for p in packed) == plain_report.train.tokens
    assert "packed into" in report.summary()


def test_chat_rows_without_assistant_are_reported_and_all_masked_is_an_error(tokenizer, write_jsonl):
    user = {"role": "user", "content": "Hi"}
    path = write_jsonl([{"messages": [user, {"role": "assistant", "content": "Hello"}]}, {"messages": [user]}])
    train, _, report = build_datasets(path, tokenizer, shuffle_seed=None)
    assert len(train) == 1 and report.train.masked_rows == (f"{path}:2",)
    assert "1 fully masked" in report.summary()
    only_users = write_jsonl([{"messages": [user]}] * 3, name="users.jsonl")
    with pytest.raises(DataError, match=r"every row has its labels fully masked .* nothing to train on$"):
        build_datasets(only_users, tokenizer)


def test_csv_prompt_completion_and_truncation_report(tokenizer, tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nWhat is 2+2?,4\nName a colour.,Blue is a colour that many people like a lot.\n")
    train, _, report = build_datasets(path, tokenizer, max_length=40, template="plain")
    assert report.format == "prompt-completion" and report.template == "plain"
    assert report.train.truncated_rows == 0
    _, _, report = build_datasets(path, tokenizer, max_length=12, template="plain")
    assert report.train.truncated_rows == 1 and report.train.tokens_lost > 0


@pytest.mark.parametrize(("kwargs", "key"), [({"val_fraction": 1.0}, "data.val_fraction"), ({"limit": 0}, "data.limit")])
def test_bad_settings_name_their_key(tokenizer, alpaca_file, kwargs, key):
    with pytest.raises(DataError, match=f"^{key}: "):
        build_datasets(alpaca_file, tokenizer, **kwargs)
