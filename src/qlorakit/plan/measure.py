"""Measure the whole-process peak RSS of `qlorakit train`, for checking `plan` against it.

A wrapper interpreter (plan/child_peak.py) runs `python -m qlorakit train ...` as its only child
and prints its own `getrusage(RUSAGE_CHILDREN).ru_maxrss`: the largest resident set the train
process ever had, allocator slack, import baseline and data included, with the anonymous and
file-backed parts sampled near that peak. Used by
bench/plan_accuracy.py and tests/plan/test_plan_accuracy.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


# Configurations differing in model, batch size, max_length and checkpointing (bench/plan_accuracy.py).
CONFIGS: list[dict] = [
    {"name": "tiny-h256-L4 b4 T256", "model": "tiny", "batch_size": 4, "max_length": 256, "checkpointing": False},
    {"name": "tiny-h256-L4 b8 T512", "model": "tiny", "batch_size": 8, "max_length": 512, "checkpointing": False},
    {"name": "tiny-h256-L4 b8 T512 ckpt", "model": "tiny", "batch_size": 8, "max_length": 512, "checkpointing": True},
    {"name": "tiny-h512-L8 b2 T1024", "model": "tiny-wide", "batch_size": 2, "max_length": 1024, "checkpointing": False},
    {"name": "smollm2 b1 T128", "model": "smollm2", "batch_size": 1, "max_length": 128, "checkpointing": False},
    {"name": "smollm2 b4 T256", "model": "smollm2", "batch_size": 4, "max_length": 256, "checkpointing": False},
    {"name": "smollm2 b4 T512 ckpt", "model": "smollm2", "batch_size": 4, "max_length": 512, "checkpointing": True},
    {"name": "smollm2 b8 T512", "model": "smollm2", "batch_size": 8, "max_length": 512, "checkpointing": False},
    # bf16 compute trains on glibc's heap (train/allocator.py), whose fragmentation grows over the
    # first steps: measured over 8 steps.
    {"name": "tiny-h256-L4 b8 T512 bf16", "model": "tiny", "batch_size": 8, "max_length": 512, "checkpointing": False,
     "dtype": "bf16", "steps": 8},
    {"name": "tiny-h512-L8 b2 T1024 bf16", "model": "tiny-wide", "batch_size": 2, "max_length": 1024,
     "checkpointing": False, "dtype": "bf16", "steps": 8},
    {"name": "tiny-h256-L4 b8 T512 ckpt bf16", "model": "tiny", "batch_size": 8, "max_length": 512, "checkpointing": True,
     "dtype": "bf16", "steps": 8},
    {"name": "smollm2 b4 T256 bf16", "model": "smollm2", "batch_size": 4, "max_length": 256, "checkpointing": False,
     "dtype": "bf16", "steps": 8},
    {"name": "smollm2 b4 T512 ckpt bf16", "model": "smollm2", "batch_size": 4, "max_length": 512, "checkpointing": True,
     "dtype": "bf16", "steps": 8},
    {"name": "smollm2 b8 T512 bf16", "model": "smollm2", "batch_size": 8, "max_length": 512, "checkpointing": False,
     "dtype": "bf16", "steps": 8},
]

TINY_MODELS = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "tiny-wide": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4),
}


def write_text_data(path: Path, rows: int = 64, words: int = 1500) -> Path:
    """`rows` text rows of `words` words each: longer than any max_length used, so every row is
    cut to exactly max_length tokens and the batch shape is (batch_size, max_length)."""
    vocab = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud".split()
    lines = [json.dumps({"text": " ".join(vocab[(i * 7 + j * 3) % len(vocab)] for j in range(words))}) for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_tiny_llama(path: Path, **shape) -> Path:
    """A random Llama directory (fp32 safetensors) with SmolLM2's tokenizer and 49,152-token vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlorakit.models.load import load_tokenizer

    if (path / "config.json").exists():
        return path
    tokenizer = load_tokenizer("smollm2")
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, **shape)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def train_config(model: str, data: Path, out: Path, batch_size: int, max_length: int, checkpointing: bool,
                 steps: int = 3, dtype: str = "fp32") -> dict:
    """The YAML mapping of one measured run (nf4 + double quant, LoRA r=16 on every linear layer)."""
    return {
        "model": {"name": model, "dtype": dtype},
        "quant": {"method": "nf4", "double_quant": True},
        "adapter": {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"path": str(data), "max_length": max_length},
        "train": {"output_dir": str(out), "max_steps": steps, "batch_size": batch_size, "save_every": None,
                  "gradient_checkpointing": checkpointing, "warmup_ratio": 0.0},
    }


def peak_rss_of_train(config_path: Path, cache_dir: Path | None = None, timeout: float = 900) -> dict:
    """child_peak's record {peak_bytes, anon_mib, file_mib} of `python -m qlorakit train CONFIG
    --overwrite --no-progress`, with
    $QLORAKIT_CACHE at `cache_dir` if given (an empty one: a first run, which quantizes the whole
    dense model instead of reading cached nf4 codes; the plan covers that run)."""
    command = [sys.executable, "-m", "qlorakit.plan.child_peak", sys.executable, "-m", "qlorakit", "train",
               str(config_path), "--overwrite", "--no-progress"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if cache_dir is not None:
        env["QLORAKIT_CACHE"] = str(cache_dir)
    out = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode:
        raise RuntimeError(f"qlorakit train {config_path} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def predicted_peak(config_path: Path) -> dict:
    """`qlorakit plan CONFIG --json` as a dict (run in a subprocess, as a user would)."""
    out = subprocess.run([sys.executable, "-m", "qlorakit", "plan", str(config_path), "--json"], capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if out.returncode:
        raise RuntimeError(f"qlorakit plan {config_path} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def measure_case(case: dict, workdir: Path, warmup: bool = False, steps: int | None = None) -> dict:
    """Predict and measure one configuration of CONFIGS over `steps` steps (default: the case's
    own, else 3); returns a row of the accuracy table."""
    steps = steps or case.get("steps", 3)
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "text.jsonl"
    if not data.exists():
        write_text_data(data)
    model = case["model"]
    if model in TINY_MODELS:
        model = str(write_tiny_llama(workdir / model, **TINY_MODELS[model]))
    slug = case["name"].replace(" ", "_")
    config = train_config(model, data, workdir / "runs" / slug, case["batch_size"], case["max_length"],
                          case["checkpointing"], steps=steps, dtype=case.get("dtype", "fp32"))
    path = workdir / f"{slug}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    plan = predicted_peak(path)
    if warmup:
        peak_rss_of_train(path)  # the page cache warm, as for a user's second command
    peak = peak_rss_of_train(path, cache_dir=Path(tempfile.mkdtemp(prefix="cold-cache-", dir=workdir)))
    predicted, measured = plan["peak_bytes"], peak["peak_bytes"]
    return {
        "name": case["name"], "model": case["model"], "batch_size": case["batch_size"], "max_length": case["max_length"],
        "gradient_checkpointing": case["checkpointing"], "dtype": config["model"]["dtype"], "steps": steps,
        "predicted_bytes": predicted, "measured_bytes": measured,
        "predicted_mib": predicted / 2**20, "measured_mib": measured / 2**20,
        "error_percent": 100.0 * (predicted - measured) / measured,
        "predicted_parts_mib": {k: round(v / 2**20, 1) for k, v in plan["parts"].items()},
        "measured_anon_mib": peak["anon_mib"], "measured_file_mib": peak["file_mib"],
        "command": f"qlorakit train {path.name} (peak RSS); qlorakit plan {path.name} --json",
    }
