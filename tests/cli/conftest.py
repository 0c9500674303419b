"""CLI tests: run `qlorakit` in-process (tests/conftest.py `cli`) on tiny models (and SmolLM2 where marked)."""

from __future__ import annotations

import json

import pytest
import yaml

QUESTION, ANSWER = "What day was I born?", "January 1, 2058"


def fact_data(path):
    """The single chat example the SmolLM2 tests teach."""
    row = {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]}
    path.write_text(json.dumps(row) + "\n")
    return path


def write_config(path, model: str, data, run_dir, quant: dict, adapter: dict, **train) -> str:
    values = {"output_dir": str(run_dir), "max_steps": 10, "batch_size": 1, "lr": 1e-2, "warmup_ratio": 0.0,
              "schedule": "constant", "max_grad_norm": 1.0, "save_every": None}
    values.update(train)
    config = {"model": {"name": model, "dtype": "fp32"}, "quant": quant, "adapter": {"r": 8, "alpha": 16, "dropout": 0.0, **adapter},
              "data": {"path": str(data), "max_length": 64}, "train": values}
    path.write_text(yaml.safe_dump(config))
    return str(path)


def error_line(err: str) -> str:
    """The one error line a failing command prints (progress bars and messages may precede it)."""
    lines = [line for line in err.splitlines() if line.startswith("qlorakit ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="session")
def tiny_runs(tiny_model_dir, tmp_path_factory):
    """Trained tiny runs: "lora" (nf4 + LoRA) and "qalora" (int4 + QA-LoRA, group 32), 10 steps each."""
    from qlorakit.cli import main

    root = tmp_path_factory.mktemp("tiny-runs")
    data = fact_data(root / "fact.jsonl")
    kinds = {"lora": ({"method": "nf4"}, {"kind": "lora"}),
             "qalora": ({"method": "int4", "group_size": 32}, {"kind": "qalora"})}
    runs = {}
    for name, (quant, adapter) in kinds.items():
        config = write_config(root / f"{name}.yaml", str(tiny_model_dir), data, root / name, quant, adapter)
        assert main(["train", config, "--no-progress", "--json"]) == 0
        runs[name] = root / name
    return runs
