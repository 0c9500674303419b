"""Tokenization and masking on the real SmolLM2 tokenizer: ids equal the full rendering, labels
train exactly the assistant content and its end-of-turn token."""

from __future__ import annotations

import pytest

from qlorakit.data.errors import DataError
from qlorakit.data.templates import chat_segments, make_renderer
from qlorakit.data.tokenize import IGNORE_INDEX, encode_segments, tokenize_rows

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy? Answer with emoji 🇮🇹 too."},
    {"role": "assistant", "content": " Rome 🇮🇹\n\nwith a trailing newline\n"},
]


def trained_text(tokenizer, example) -> list[str]:
    """Decode each run of consecutive trainable labels."""
    runs, current = [], []
    for label in example["labels"] + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


def tokenize_chat(tokenizer, messages, **kwargs):
    return tokenize_rows([chat_segments(messages, tokenizer)], ["x.jsonl:1"], tokenizer, **kwargs)


def test_ids_equal_tokenizing_the_full_rendering(tokenizer):
    ids, _ = encode_segments(chat_segments(CHAT, tokenizer), tokenizer)
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids == list(tokenizer.apply_chat_template(CHAT, tokenize=True)["input_ids"])


def test_chat_trains_exactly_the_assistant_content_and_end_of_turn(tokenizer):
    (example,), report = tokenize_chat(tokenizer, CHAT)
    assert trained_text(tokenizer, example) == [
        "Paris.<|im_end|>",
        " Rome 🇮🇹\n\nwith a trailing newline\n<|im_end|>",
    ]
    assert report.trainable_tokens == sum(label != IGNORE_INDEX for label in example["labels"])
    assert report.tokens == len(example["input_ids"]) and report.masked_rows == ()


def test_default_system_prompt_is_context(tokenizer):
    (example,), _ = tokenize_chat(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    assert trained_text(tokenizer, example) == ["Hello!<|im_end|>"]
    assert tokenizer.decode(example["input_ids"]).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_train_on_prompt_trains_everything_but_the_first_token(tokenizer):
    (example,), _ = tokenize_chat(tokenizer, CHAT, train_on_prompt=True)
    assert example["labels"][0] == IGNORE_INDEX  # nothing precedes it, so nothing predicts it
    assert example["labels"][1:] == example["input_ids"][1:]


def test_alpaca_masks_the_prompt(tokenizer):
    render = make_renderer("alpaca", "alpaca", tokenizer)
    row = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."}
    (example,), _ = tokenize_rows([render(row, "x:1")], ["x:1"], tokenizer)
    assert trained_text(tokenizer, example) == ["The sum is 5.<|im_end|>"]
    assert example["input_ids"][-1] == tokenizer.eos_token_id


def test_truncation_is_counted(tokenizer):
    short = chat_segments(CHAT[:3], tokenizer)
    long = chat_segments(CHAT, tokenizer)
    n_short = len(encode_segments(short, tokenizer)[0])
    n_long = len(encode_segments(long, tokenizer)[0])
    assert n_short < n_long
    examples, report = tokenize_rows([short, long], ["x:1", "x:2"], tokenizer, max_length=n_short)
    assert [len(e["input_ids"]) for e in examples] == [n_short, n_short]
    assert (report.rows, report.truncated_rows, report.tokens_lost) == (2, 1, n_long - n_short)
    assert report.tokens == 2 * n_short


def test_rows_masked_after_truncation_are_dropped_and_named(tokenizer):
    rows = [chat_segments(CHAT[:3], tokenizer), chat_segments(CHAT[:2], tokenizer)]  # row 2: no assistant turn
    examples, report = tokenize_rows(rows, ["x.jsonl:1", "x.jsonl:7"], tokenizer)
    assert len(examples) == 1 and report.masked_rows == ("x.jsonl:7",)
    _, report = tokenize_rows(rows, ["x.jsonl:1", "x.jsonl:7"], tokenizer, max_length=10, require_trainable=False)
    assert report.masked_rows == ("x.jsonl:1", "x.jsonl:7") and report.truncated_rows == 2


def test_every_row_masked_is_an_error(tokenizer):
    rows = [chat_segments([{"role": "user", "content": f"question {i}"}], tokenizer) for i in range(3)]
    with pytest.raises(DataError) as e:
        tokenize_rows(rows, ["x.jsonl:1", "x.jsonl:2", "x.jsonl:3"], tokenizer, source="x.jsonl")
    assert str(e.value).startswith("x.jsonl: every row has its labels fully masked (no assistant turn")
    assert str(e.value).endswith("nothing to train on")
