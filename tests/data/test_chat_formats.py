"""Chat rows on a tokenizer without a chat template: the format chosen, rendered, saved with the run,
restored, and written into the merged directory (data/chat_formats.py)."""

from __future__ import annotations

import copy
import json

import pytest

from qlorakit.data.chat_formats import CHATML, GEMMA, family_chat_format
from qlorakit.data.dataset import build_datasets
from qlorakit.data.templates import choose_template, chat_segments
from tests.conftest import save_tiny_llama, write_jsonl

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."}]


@pytest.fixture
def bare_tokenizer(smollm2_tokenizer):
    """SmolLM2's tokenizer with its chat template removed (as a base model's tokenizer has none)."""
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = None
    return tokenizer


def test_chatml_renders_turns_and_trains_the_answer(bare_tokenizer):
    bare_tokenizer.chat_template = CHATML
    segments = chat_segments(CHAT, bare_tokenizer)
    text = "".join(t for t, _ in segments)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
                    "<|im_start|>assistant\nParis.<|im_end|>\n")
    assert [t for t, trainable in segments if trainable] == ["Paris.<|im_end|>"]


def test_gemma_format_puts_the_system_turn_in_the_first_user_turn(bare_tokenizer):
    bare_tokenizer.chat_template = GEMMA
    text = bare_tokenizer.apply_chat_template(CHAT, tokenize=False)
    bos = bare_tokenizer.bos_token or ""
    assert text == (f"{bos}<start_of_turn>user\nBe brief.\n\nCapital of France?<end_of_turn>\n"
                    "<start_of_turn>model\nParis.<end_of_turn>\n")
    prompt = bare_tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<start_of_turn>model\n")


def test_family_format_follows_the_vocabulary(bare_tokenizer):
    assert family_chat_format(bare_tokenizer) == "chatml"  # SmolLM2's vocabulary has no Gemma turn tokens


def test_auto_gives_a_tokenizer_without_template_its_family_format(bare_tokenizer, tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    train, _, report = build_datasets(data, bare_tokenizer, max_length=128)
    assert report.template == "chatml" and bare_tokenizer.chat_template == CHATML
    assert "given to the tokenizer as its chat template" in report.summary()
    labels = [t for t, l in zip(train[0]["input_ids"], train[0]["labels"]) if l != -100]
    assert bare_tokenizer.decode(labels) == "Paris.<|im_end|>"


def test_chat_still_refuses_a_tokenizer_without_template(bare_tokenizer):
    from qlorakit.data.errors import DataError

    with pytest.raises(DataError, match="set data.template to chatml, gemma, alpaca or plain"):
        choose_template("chat", "chat", bare_tokenizer)
    assert bare_tokenizer.chat_template is None


def test_an_explicit_format_replaces_the_tokenizers_own(smollm2_tokenizer):
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    assert choose_template("gemma", "chat", tokenizer) == "gemma" and tokenizer.chat_template == GEMMA


def test_the_run_saves_restores_and_merges_the_given_format(bare_tokenizer, tmp_path, cli):
    from transformers import AutoTokenizer

    from qlorakit.models.restore import load_run
    from tests.cli.conftest import write_config

    model_dir = save_tiny_llama(tmp_path / "base", bare_tokenizer, initializer_range=0.2)
    assert AutoTokenizer.from_pretrained(model_dir).chat_template is None
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    config = write_config(tmp_path / "c.yaml", str(model_dir), data, tmp_path / "run", {"method": "nf4"}, {"kind": "lora"},
                          max_steps=2)
    assert cli("train", config, "--no-progress").returncode == 0
    assert (tmp_path / "run" / "adapter" / "chat_template.jinja").read_text() == CHATML
    loaded, _ = load_run(tmp_path / "run", progress=False)
    assert loaded.tokenizer.chat_template == CHATML
    assert cli("merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged"), "--force").returncode == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == CHATML
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
