"""Shared fixtures: tiny models built from a config in-process, offline, the real SmolLM2, and
`cli`, which runs `qlorakit ARGS` in this process."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # an accidental download fails loudly

import json
from dataclasses import dataclass

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


@pytest.fixture(scope="session")
def gemma3_path():
    """Gemma 3 270M Q4_K_M, assembled once from its PyPI packages into the cache directory."""
    from qlorakit.files.cache import cache_root
    from qlorakit.models.embedded import gemma3_gguf_path

    return gemma3_gguf_path(cache_root())


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


@dataclass
class CliResult:
    """What `qlorakit ARGS` returned and printed; the attribute names of subprocess.CompletedProcess,
    so a check written for either runs on both."""

    returncode: int
    stdout: str
    stderr: str

    def __iter__(self):  # code, out, err = cli(...)
        return iter((self.returncode, self.stdout, self.stderr))


@pytest.fixture
def cli(capsys):
    """`cli(*args)` runs `qlorakit ARGS` in this process (`qlorakit.cli.main(argv)`) and returns its
    CliResult: the exit code `main` returns (argparse's SystemExit code for a usage error) and what
    it printed. Spawning `python -m qlorakit` costs seconds of imports per call and checks nothing
    more, except where the process itself is the point (the executable's exit, signals): those tests
    use tests/reliability/conftest.py `run_cli` / `run_cli_killed_after`."""
    from qlorakit.cli import main

    def run(*args) -> CliResult:
        capsys.readouterr()  # drop what the test printed before
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:  # argparse: --help (0) and usage errors (2)
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run
