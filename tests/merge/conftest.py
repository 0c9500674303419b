"""Merge-test helpers: quantized tiny models with random adapters, and a tiny chat tokenizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlorakit.adapters.inject import add_adapters, adapter_layers
from qlorakit.quant.registry import get_format
from qlorakit.quant.replace import quantize_model
from tests.conftest import build_tiny, tiny_gpt2_config, tiny_llama_config

CONFIGS = {
    "llama": lambda: tiny_llama_config(),
    "llama-tied": lambda: tiny_llama_config(tie_word_embeddings=True),
    "gpt2": lambda: tiny_gpt2_config(),  # Conv1D layers; GPT-2 ties its head by default
}

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)
WORDS = (
    "user assistant system what is the capital of france explain in one sentence a prime number write "
    "haiku about sea list three primary colors how do i boil an egg day was born ? . ,"
).split()


def adapter_model(config, fmt: str = "nf4", kind: str = "lora", seed: int = 0, group_size: int | None = None, **fmt_options):
    """Tiny model of `config`, quantized to `fmt` (fp32 compute), all-linear adapters with random B."""
    model = build_tiny(config)
    quantize_model(model, get_format(fmt, **fmt_options), torch.float32, progress=False)
    add_adapters(model, "all-linear", r=4, alpha=8, kind=kind, group_size=group_size)
    torch.manual_seed(seed + 1)
    for layer in adapter_layers(model).values():
        nn.init.normal_(layer.lora_B.weight, std=0.05)
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture
def random_ids():
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A 256-entry word-level tokenizer with a ChatML-like chat template (matches the tiny vocab)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>", *WORDS]
    tokens += [f"w{i}" for i in range(256 - len(tokens))]
    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    assert len(tokenizer) == 256
    return tokenizer
