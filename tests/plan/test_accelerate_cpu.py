"""configs/accelerate/cpu-2proc.yaml really starts two ranks (accelerate's `--cpu` starts one)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlorakit.config import save_config
from tests.train.conftest import tiny_config, write_jsonl
from tests.train.test_distributed import _free_port

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "accelerate" / "cpu-2proc.yaml"


@pytest.mark.slow
def test_accelerate_cpu_config_starts_two_ranks(tiny_model_dir, tmp_path):
    rows = [{"instruction": f"Name item {i}.", "input": "", "output": f"Item {i}."} for i in range(8)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = tiny_config(tiny_model_dir, data, tmp_path / "run", max_steps=2, batch_size=2)
    save_config(cfg, tmp_path / "run.yaml")
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--config_file", str(CONFIG), "--main_process_port", str(_free_port()),
               "-m", "qlorakit", "train", str(tmp_path / "run.yaml"), "--no-progress"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    first = next(line for line in out.stderr.splitlines() if line.strip() and "warn" not in line.lower())
    assert first == "world size: 2"
    assert "effective batch 2 x 1 x 2 = 4" in out.stderr
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2  # rank 0 alone writes


@pytest.mark.slow
def test_accelerate_fsdp_config_trains_sharded(tiny_model_dir, tmp_path):
    """configs/accelerate/fsdp-qlora.yaml starts two ranks and selects train.distributed: fsdp."""
    from safetensors.torch import load_file

    rows = [{"instruction": f"Name item {i}.", "input": "", "output": f"Item {i}."} for i in range(8)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = tiny_config(tiny_model_dir, data, tmp_path / "run", max_steps=2, batch_size=2)
    assert cfg.train.distributed == "ddp"  # the launcher's config chooses fsdp, not this one
    save_config(cfg, tmp_path / "run.yaml")
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--config_file", str(CONFIG.with_name("fsdp-qlora.yaml")), "--main_process_port",
               str(_free_port()), "-m", "qlorakit", "train", str(tmp_path / "run.yaml"), "--no-progress"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip() and "warn" not in line.lower()]
    assert lines[0] == "world size: 2", lines[:3]
    assert lines[1] == "accelerate's FSDP config (ACCELERATE_USE_FSDP=true) selects train.distributed: fsdp"
    assert lines[2] == "FSDP shards the model across 2 ranks (train.distributed: fsdp)", lines[2]
    assert any(line.startswith("FSDP: 3 units (2 decoder layers and the root)") for line in lines)
    assert "effective batch 2 x 1 x 2 = 4" in out.stderr
    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 64)  # gathered whole
