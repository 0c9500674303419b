"""`qlorakit plan CONFIG --suggest OUT.yaml`: the written config's own plan fits the budget; the
effective batch is kept; the rank follows the documented rule; what cannot fit is refused."""

from __future__ import annotations

import json
from collections import namedtuple

import pytest
import yaml

from qlorakit.config import load_config
from qlorakit.plan.suggest import TARGET_SHARE, rank_for

GIB = 2**30


def _plan(cli, *args):
    result = cli("plan", *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_llama2_7b_at_8gib_writes_a_config_whose_own_plan_fits(cli, tmp_path):
    """The issue's example: configs/plan-llama2-7b.yaml (no checkpointing) does not fit 8 GiB; the
    suggestion does, and re-planning the written file says so."""
    before = _plan(cli, "configs/plan-llama2-7b.yaml", "--gpu-memory", "8GiB")
    assert before["fits"] is False
    out = tmp_path / "suggested.yaml"
    result = _plan(cli, "configs/plan-llama2-7b.yaml", "--gpu-memory", "8GiB", "--suggest", out)
    suggestion = result["suggestion"]
    assert suggestion["fits"] and result["peak_bytes"] <= TARGET_SHARE * 8 * GIB
    assert [c["key"] for c in suggestion["changes"]] == ["train.gradient_checkpointing"]
    written = load_config(out)
    assert written.train.gradient_checkpointing and written.adapter.r == 8  # 7B: rule 16, the config's 8 is smaller
    again = _plan(cli, str(out), "--gpu-memory", "8GiB")
    assert again["fits"] and again["peak_bytes"] == result["peak_bytes"]
    text = cli("plan", "configs/plan-llama2-7b.yaml", "--gpu-memory", "8GiB", "--suggest", out, "--overwrite").stdout
    assert "train.gradient_checkpointing: False -> True" in text and "about a third more compute" in text


def test_the_effective_batch_is_kept_and_the_rank_follows_the_rule(cli, tmp_path):
    """A 7B config with r=64 and batch 16 at 12 GiB: r becomes 16 (1-13 B), the micro-batch the
    largest divisor of 16 that fits, grad_accum the rest."""
    out = tmp_path / "s.yaml"
    result = _plan(cli, "configs/plan-llama2-7b.yaml", "adapter.r=64", "adapter.alpha=128", "train.batch_size=16",
                   "data.max_length=1024", "--gpu-memory", "12GiB", "--suggest", out)
    written = load_config(out)
    assert written.adapter.r == 16 and written.adapter.alpha == 32  # alpha / r kept
    assert written.train.batch_size * written.train.grad_accum == 16 and written.train.batch_size < 16
    assert 16 % written.train.batch_size == 0
    assert result["suggestion"]["fits"]
    # the micro-batch is the largest that fits: twice it does not
    bigger = written.train.batch_size * 2
    if bigger <= 16:
        over = _plan(cli, str(out), f"train.batch_size={bigger}", "--gpu-memory", "12GiB")
        assert over["peak_bytes"] > TARGET_SHARE * 12 * GIB


def test_rank_rule():
    assert (rank_for(135_000_000), rank_for(7_000_000_000), rank_for(13_000_000_000), rank_for(70_000_000_000)) == (32, 16, 16, 8)


def test_what_cannot_fit_is_refused_and_nothing_is_written(cli, tmp_path):
    out = tmp_path / "s.yaml"
    result = cli("plan", "configs/plan-llama2-7b.yaml", "--gpu-memory", "2GiB", "--suggest", out)
    assert result.returncode == 1 and "\n" not in result.stderr.strip()
    assert "no configuration fits 90% of 2.00 GiB" in result.stderr and not out.exists()
    out.write_text("mine")
    result = cli("plan", "configs/plan-llama2-7b.yaml", "--gpu-memory", "8GiB", "--suggest", out)
    assert result.returncode == 1 and "exists; choose another path or pass --overwrite" in result.stderr
    assert out.read_text() == "mine"


def test_cpu_budget_is_this_machines_free_memory(cli, tmp_path, monkeypatch):
    import psutil

    Memory = namedtuple("Memory", "available total")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory(20 * GIB, 24 * GIB))
    out = tmp_path / "s.yaml"
    result = _plan(cli, "model.name=configs/models/llama-2-7b", "train.batch_size=4", "data.max_length=1024", "--suggest", out)
    suggestion = result["suggestion"]
    assert suggestion["budget_bytes"] == 20 * GIB and suggestion["budget_source"] == "this machine's free memory now"
    assert suggestion["fits"] and result["peak_bytes"] <= TARGET_SHARE * 20 * GIB
    assert result["device"] == "cpu"
    assert yaml.safe_load(out.read_text())["train"]["batch_size"] * yaml.safe_load(out.read_text())["train"]["grad_accum"] == 4
