"""The measured process baseline (plan/baseline.py) and the peak-RSS wrapper of the plan's
calibration (bench/child_peak.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig

from qlorakit.config import config_from_dict
from qlorakit.plan import report
from qlorakit.plan.baseline import Baseline, BaselineProbe
from qlorakit.plan.estimate import MIB, RSS_BASE
from qlorakit.plan.report import plan_config

CHILD_PEAK = str(Path(__file__).resolve().parents[2] / "bench" / "child_peak.py")


def _peak_of(code: str) -> dict:
    out = subprocess.run([sys.executable, CHILD_PEAK, sys.executable, "-c", code],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_child_peak_sees_a_touched_allocation_as_anonymous_memory():
    # 300 MiB written byte by byte is resident and anonymous; it is held for 0.5 s so that the
    # 10 ms sampler sees it.
    peak = _peak_of("import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.5)")
    assert peak["peak_bytes"] >= 300 * MIB
    assert 290 <= peak["anon_mib"] <= peak["peak_bytes"] / MIB


def test_child_peak_passes_on_the_childs_failure():
    out = subprocess.run([sys.executable, CHILD_PEAK, sys.executable, "-c", "raise SystemExit(3)"],
                         capture_output=True, text=True)
    assert out.returncode == 3


def test_probe_measures_more_than_torch_alone_and_loads_the_tokenizer(tiny_model_dir):
    torch_only = _peak_of("import torch")["peak_bytes"]
    baseline = BaselineProbe(str(tiny_model_dir)).result()
    assert baseline.how == "measured on this machine"
    assert torch_only < baseline.bytes < 2 * RSS_BASE


def test_probe_of_a_config_only_directory_says_the_tokenizer_is_missing(tmp_path):
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=100).save_pretrained(tmp_path / "model")
    baseline = BaselineProbe(str(tmp_path / "model")).result()
    assert baseline.how.startswith("measured on this machine, without the tokenizer")


def _cpu_cfg(model_dir):
    return config_from_dict({"model": {"name": str(model_dir), "dtype": "fp32"}, "quant": {"method": "nf4"},
                             "adapter": {"r": 8}, "data": {"max_length": 64}, "train": {"batch_size": 1}})


class _FixedProbe:
    def __init__(self, model_name):
        pass

    def result(self):
        return Baseline(123 * MIB, "measured on this machine")


class _FailingProbe(_FixedProbe):
    def result(self):
        raise RuntimeError("measuring the process baseline failed: ImportError: no torch")


def test_cpu_plan_uses_the_measured_baseline_in_training_and_loading(tiny_model_dir, monkeypatch):
    cfg = _cpu_cfg(tiny_model_dir)
    monkeypatch.setattr(report, "BaselineProbe", _FixedProbe)
    measured = plan_config(cfg)
    monkeypatch.setattr(report, "BaselineProbe", _FailingProbe)
    calibrated = plan_config(cfg)
    assert measured.parts["framework"] == 123 * MIB
    assert calibrated.parts["framework"] == RSS_BASE
    assert calibrated.train_bytes - measured.train_bytes == RSS_BASE - 123 * MIB
    assert calibrated.load_bytes - measured.load_bytes == RSS_BASE - 123 * MIB
    assert "process baseline 123.0 MiB measured on this machine" in measured.assumptions[-1]
    assert "as calibrated, not measured (measuring the process baseline failed: ImportError" in calibrated.assumptions[-1]


def test_gpu_plan_starts_no_probe(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(report, "BaselineProbe", lambda name: pytest.fail("a CUDA plan measured the host baseline"))
    plan_config(_cpu_cfg(tiny_model_dir), gpu_memory=80 * 2**30)
