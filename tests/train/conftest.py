"""Small datasets and configs for the tiny model of tests/conftest.py."""

import pytest

from tests.conftest import write_jsonl  # noqa: F401  (re-exported for the tests here)


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
