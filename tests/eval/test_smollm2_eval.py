"""The real SmolLM2: eval's answer metrics and chat agree with what the model knows."""

import argparse
import json
import math

import pytest

from tests.eval.conftest import write_jsonl


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_knows_paris(tmp_path, capsys):
    from qlorakit.eval.commands import run_eval

    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "What is the capital of France?", "answer": "The capital of France is Paris."}])
    args = argparse.Namespace(model="smollm2", compare=[], data=str(data), metrics="contains,ppl,exact", max_new_tokens=12,
                              max_length=64, lm_eval_tasks=None, out=None, no_progress=True, json=True)
    assert run_eval(args) == 0
    metrics = json.loads(capsys.readouterr().out)["results"][0]["metrics"]
    assert metrics["contains"] == 1.0, metrics  # greedy reply: "The capital of France is Paris."
    assert math.isfinite(metrics["ppl"]) and 1.0 < metrics["ppl"] < 10, metrics
