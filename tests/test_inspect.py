"""`qlorakit inspect`: the figures of the foundation issue, from the architecture alone."""

import json
import subprocess
import sys

import pytest

from qlorakit.inspect import inspect_model


@pytest.fixture
def distilgpt2_config_dir(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=6, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024).save_pretrained(tmp_path)
    return tmp_path


def test_distilgpt2_lora_r8_figures(distilgpt2_config_dir):
    """Seed 002's arithmetic: 81,912,576 base, 589,824 trainable (0.7149%)."""
    report = inspect_model(str(distilgpt2_config_dir), quant="nf4", lora_r=8, lora_targets=["c_attn", "c_proj", "c_fc"])
    assert report.total_parameters == 81_912_576
    assert report.trainable_parameters == 589_824
    assert report.all_parameters == 82_502_400
    assert round(report.trainable_percent, 4) == 0.7149
    # 4-bit linear weights: 42,467,328 / 2 bytes; other 39,445,248 parameters in bf16.
    assert report.quantized_parameters == 42_467_328
    assert report.memory_mib_after == pytest.approx((42_467_328 / 2 + 39_445_248 * 2) / 2**20)
    assert round(report.memory_mib_after, 1) == 95.5
    assert report.memory_mib_before == pytest.approx(81_912_576 * 2 / 2**20)


def test_smollm2_trainable_all_linear():
    report = inspect_model("smollm2", quant="nf4", lora_r=16, lora_targets="all-linear")
    assert report.trainable_parameters == 4_884_480
    assert report.total_parameters == 134_515_008  # tied head counted once
    assert report.lora_layers == 210


def test_cli_json_prints_one_object(distilgpt2_config_dir):
    out = subprocess.run(
        [sys.executable, "-m", "qlorakit", "inspect", str(distilgpt2_config_dir), "--lora-r", "8",
         "--lora-targets", "c_attn,c_proj,c_fc", "--json"],
        capture_output=True, text=True, check=True,
    )
    payload = json.loads(out.stdout)
    assert payload["trainable_parameters"] == 589_824 and payload["total_parameters"] == 81_912_576


def test_cli_error_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "qlorakit", "inspect", str(tmp_path / "nope")], capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and "no such model file or directory" in out.stderr
    assert "Traceback" not in out.stderr
