"""Shared fixtures: tiny models built from a config in-process, offline, and the real SmolLM2."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # an accidental download fails loudly

import json

import pytest
import torch


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_gpt2_config(**overrides):
    from transformers import GPT2Config

    values = dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    values.update(overrides)
    return GPT2Config(**values)


def build_tiny(config, seed: int = 0, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


@pytest.fixture
def tiny_llama():
    return build_tiny(tiny_llama_config())


@pytest.fixture
def tiny_gpt2():
    return build_tiny(tiny_gpt2_config())


@pytest.fixture(scope="session")
def smollm2_path():
    from qlorakit.models.embedded import smollm2_gguf_path

    return smollm2_gguf_path()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def save_tiny_llama(path, tokenizer, **overrides):
    """A tiny Llama directory with `tokenizer`'s vocabulary and chat template; fp32 safetensors."""
    config = tiny_llama_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **overrides)
    build_tiny(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from qlorakit.models.load import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """hidden 64, 2 layers, SmolLM2's 49,152-token vocabulary and chat template; initializer
    range 0.2 so that logits are large enough for a frozen head to express a fit."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_tokenizer, initializer_range=0.2)
