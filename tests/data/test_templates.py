"""Templates: seed 002's Alpaca text, chat turns found by incremental rendering, template choice."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from qlorakit.data.errors import DataError
from qlorakit.data.templates import chat_segments, make_renderer, resolve_template

SEED_002_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:\n{}"
)


def test_alpaca_with_input_is_seed_002_text_plus_eos(tokenizer):
    render = make_renderer("alpaca", "alpaca", tokenizer)
    row = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    segments = render(row, "x:1")
    assert "".join(t for t, _ in segments) == SEED_002_WITH_INPUT.format("Add the numbers.", "2 and 3", "5") + "<|im_end|>"
    assert segments[-1] == ("5<|im_end|>", True)
    assert not any(trainable for _, trainable in segments[:-1])


def test_alpaca_without_input(tokenizer):
    render = make_renderer("alpaca", "alpaca", tokenizer)
    segments = render({"instruction": "Say hi.", "input": "", "output": "Hi"}, "x:1")
    assert segments == [
        (
            "Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\nSay hi.\n\n### Response:\n",
            False,
        ),
        ("Hi<|im_end|>", True),
    ]


def test_chat_segments_cover_the_rendering_and_train_assistant_turns(tokenizer):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    segments = chat_segments(messages, tokenizer)
    assert "".join(t for t, _ in segments) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert [t for t, tr in segments if tr] == ["Hello!<|im_end|>", "4<|im_end|>"]


def test_chat_without_assistant_turn_has_nothing_trainable(tokenizer):
    segments = chat_segments([{"role": "user", "content": "Hi"}], tokenizer)
    assert not any(tr for _, tr in segments)


class UnstableTemplate:
    """Not prefix-stable: ends a conversation with <eoc>, and with ``rewrite`` shows earlier
    assistant turns as "..." (as templates that drop earlier reasoning do)."""

    eos_token = "</s>"

    def __init__(self, rewrite: bool) -> None:
        self.rewrite = rewrite

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        hide = lambda i, m: self.rewrite and m["role"] == "assistant" and i != last  # noqa: E731
        text = "".join(f"<{m['role']}>{'...' if hide(i, m) else m['content']}</s>" for i, m in enumerate(messages))
        return text + ("<assistant>" if add_generation_prompt else "<eoc>")


TWO_TURNS = [
    {"role": "user", "content": "a"},
    {"role": "assistant", "content": "b"},
    {"role": "user", "content": "c"},
    {"role": "assistant", "content": "d"},
]


def test_chat_falls_back_to_finding_content_when_not_prefix_stable():
    segments = chat_segments(TWO_TURNS, UnstableTemplate(rewrite=False))
    assert "".join(t for t, _ in segments) == "<user>a</s><assistant>b</s><user>c</s><assistant>d</s><eoc>"
    assert [t for t, tr in segments if tr] == ["b</s>", "d</s><eoc>"]


def test_chat_turn_rewritten_by_the_template_stays_untrained():
    segments = chat_segments(TWO_TURNS, UnstableTemplate(rewrite=True))
    assert [t for t, tr in segments if tr] == ["d</s>"]  # found by content: its prefix shows "b", the full text "..."


def test_template_choice():
    with_chat = SimpleNamespace(chat_template="{{ x }}")
    without = SimpleNamespace(chat_template=None)
    assert resolve_template("auto", "alpaca", with_chat) == "alpaca"
    assert resolve_template("auto", "chat", with_chat) == "chat"
    assert resolve_template("auto", "prompt-completion", with_chat) == "chat"
    assert resolve_template("auto", "prompt-completion", without) == "plain"
    assert resolve_template("auto", "text", with_chat) == "plain"
    assert resolve_template("chat", "alpaca", with_chat) == "chat"
    with pytest.raises(DataError, match="^data.template: the tokenizer has no chat template"):
        resolve_template("chat", "chat", without)
    with pytest.raises(DataError, match="^data.template: template 'alpaca' cannot render chat rows"):
        resolve_template("alpaca", "chat", with_chat)
    with pytest.raises(DataError, match="^data.template: unknown template 'llama'"):
        resolve_template("llama", "chat", with_chat)


def test_prompt_completion_plain_and_chat(tokenizer):
    row = {"prompt": "Capital of France?", "completion": " Paris"}
    plain = make_renderer("plain", "prompt-completion", tokenizer)(row, "x:1")
    assert plain == [("Capital of France?", False), (" Paris<|im_end|>", True)]
    chat = make_renderer("chat", "prompt-completion", tokenizer)(row, "x:1")
    assert [t for t, tr in chat if tr] == [" Paris<|im_end|>"]
    assert chat[0][0].endswith("<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n")
