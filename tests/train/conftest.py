"""A tiny Llama-like HF model directory with SmolLM2's real tokenizer, and small datasets."""

import json

import pytest

from tests.conftest import build_tiny, tiny_llama_config


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from qlorakit.models.load import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """hidden 64, 2 layers, SmolLM2's 49,152-token vocabulary and chat template; fp32 weights."""
    path = tmp_path_factory.mktemp("tiny-llama")
    config = tiny_llama_config(vocab_size=len(smollm2_tokenizer), pad_token_id=smollm2_tokenizer.pad_token_id,
                               eos_token_id=smollm2_tokenizer.eos_token_id, bos_token_id=smollm2_tokenizer.bos_token_id,
                               initializer_range=0.2)  # logits large enough for a frozen head to express a fit
    build_tiny(config).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def qa_rows():
    """20 Alpaca rows with short, learnable answers."""
    colours = ["red", "blue", "green", "black", "white"]
    return [
        {"instruction": f"What colour is item {i}?", "input": "", "output": f"Item {i} is {colours[i % 5]}."}
        for i in range(20)
    ]


def tiny_config(model_dir, data_path, output_dir, **train):
    from qlorakit.config import config_from_dict

    values = {"output_dir": str(output_dir), "max_steps": 30, "batch_size": 4, "lr": 1e-2, "warmup_ratio": 0.0,
              "save_every": None, "max_grad_norm": 1.0}
    values.update(train)
    return config_from_dict({
        "model": {"name": str(model_dir), "dtype": "fp32"},
        "quant": {"method": "nf4"},
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"path": str(data_path), "max_length": 64},
        "train": values,
    })
