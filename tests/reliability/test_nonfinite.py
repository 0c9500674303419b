"""A NaN/inf loss stops training with an error naming the step and keeps the last good
checkpoint; train.skip_nonfinite: true skips such batches instead.

The fault is injected through `qlorakit.train.loop._forward_loss`, the one function a step calls
per micro-batch: the real forward runs, on a model whose adapter weight was set to inf (stop case),
or its loss is multiplied by NaN for one step only (skip case)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from qlorakit.config import config_from_dict
from qlorakit.train import loop
from tests.reliability.conftest import QA_ROWS, write_jsonl


def _config(model_dir, data, out, **train):
    values = {"output_dir": str(out), "max_steps": 5, "batch_size": 2, "lr": 1e-3, "warmup_ratio": 0.0,
              "save_every": 2, "log_every": 1, "max_grad_norm": 1.0}
    values.update(train)
    return config_from_dict({
        "model": {"name": str(model_dir), "dtype": "fp32"}, "quant": {"method": "nf4"},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0}, "data": {"path": str(data), "max_length": 48}, "train": values,
    })


def _fault_at(monkeypatch, bad_call: int, how: str):
    real = loop._forward_loss
    calls = {"n": 0}

    def forward_loss(model, batch, num_items, device):
        calls["n"] += 1
        if how == "inf-weight" and calls["n"] == bad_call:
            name, weight = next((n, p) for n, p in model.named_parameters() if "lora_A" in n)
            with torch.no_grad():
                weight.fill_(math.inf)  # a diverged adapter: the forward itself goes non-finite
        loss = real(model, batch, num_items, device)
        if how == "nan-loss" and calls["n"] == bad_call:
            loss = loss * math.nan  # one bad batch; the next ones are fine
        return loss

    monkeypatch.setattr(loop, "_forward_loss", forward_loss)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", QA_ROWS)
    out = tmp_path / "run"
    _fault_at(monkeypatch, bad_call=3, how="inf-weight")
    with pytest.raises(loop.NonFiniteLossError) as caught:
        loop.train(_config(tiny_model_dir, data, out), progress=False)
    message = str(caught.value)
    assert message.startswith("step 3:") and "not finite" in message and "train.skip_nonfinite" in message
    assert "\n" not in message
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step-2"]  # no temporaries, nothing after the fault
    state = load_file(str(out / "checkpoints" / "step-2" / "adapter_model.safetensors"))
    assert state and all(torch.isfinite(t).all() for t in state.values())
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert not (out / "adapter").exists()  # no final adapter from a broken run


def test_skip_nonfinite_skips_the_batch(tmp_path, tiny_model_dir, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", QA_ROWS)
    out = tmp_path / "run"
    _fault_at(monkeypatch, bad_call=3, how="nan-loss")
    result = loop.train(_config(tiny_model_dir, data, out, skip_nonfinite=True), progress=False)
    assert result.steps == 5 and math.isfinite(result.final_loss)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[2].get("skipped") is True and records[2]["loss"] is None
    assert all(math.isfinite(r["loss"]) for r in records if r["step"] != 3)
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in adapter.values())


def test_resume_after_nonfinite_stop(tmp_path, tiny_model_dir, monkeypatch):
    """The kept checkpoint is usable: resuming (without the fault) finishes the run."""
    data = write_jsonl(tmp_path / "train.jsonl", QA_ROWS)
    out = tmp_path / "run"
    _fault_at(monkeypatch, bad_call=3, how="inf-weight")
    with pytest.raises(loop.NonFiniteLossError):
        loop.train(_config(tiny_model_dir, data, out), progress=False)
    monkeypatch.undo()
    result = loop.train(_config(tiny_model_dir, data, out, resume=True), progress=False)
    assert result.resumed_from.endswith("step-2") and result.steps == 5 and math.isfinite(result.final_loss)


# --- through the CLI: lr = 1e30 makes step 1's AdamW update ~1e30, so step 2's forward overflows ----------

def _cli_nonfinite(tmp_path, model_dir, *overrides):
    from tests.reliability.conftest import run_cli, snapshot, write_config

    data = write_jsonl(tmp_path / "train.jsonl", QA_ROWS)
    out = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", model_dir, data, out,
                          train={"max_steps": 4, "lr": 1e30, "save_every": 1, "warmup_ratio": 0.0})
    inputs = snapshot(data, config, model_dir)
    result = run_cli("train", config, "--no-progress", *overrides)
    assert snapshot(data, config, model_dir) == inputs
    return result, out


@pytest.mark.slow
def test_cli_nonfinite_loss_exits_1_naming_the_step(tmp_path, tiny_model_dir):
    from tests.reliability.conftest import assert_cli_error

    result, out = _cli_nonfinite(tmp_path, tiny_model_dir)
    last = assert_cli_error(result, "train", "step 2: loss nan", "not finite", str(out / "checkpoints"), "train.skip_nonfinite")
    assert result.stdout == ""
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]  # the last good one, no temporaries
    state = load_file(str(out / "checkpoints" / "step-1" / "adapter_model.safetensors"))
    assert state and all(torch.isfinite(t).all() for t in state.values()), last
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (out / "adapter").exists() and not (out / "loss.png").exists()


@pytest.mark.slow
def test_cli_skip_nonfinite_skips_and_keeps_the_weights(tmp_path, tiny_model_dir):
    result, out = _cli_nonfinite(tmp_path, tiny_model_dir, "train.skip_nonfinite=true", "--json")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert json.loads(result.stdout)["steps"] == 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert math.isfinite(records[0]["loss"]) and not records[0].get("skipped")
    assert all(r["skipped"] is True and r["loss"] is None for r in records[1:])
    # a skipped batch changes nothing: the final adapter is step 1's, bit for bit
    after_step_1 = load_file(str(out / "checkpoints" / "step-1" / "adapter_model.safetensors"))
    final = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert final.keys() == after_step_1.keys()
    assert all(torch.equal(final[k], after_step_1[k]) and torch.isfinite(final[k]).all() for k in final)
