"""Fixtures for the bad-input tests: a tiny HF model, configs, process runners, input snapshots.

CLI error tests run `qlorakit ...` in-process (tests/conftest.py `cli`) and check the contract:
exit 1, the last stderr line is `qlorakit <command>: error: ...` naming the problem, no traceback,
no output left behind, inputs unchanged. `run_cli` runs `python -m qlorakit ...` in a subprocess
(HF_HUB_OFFLINE=1) and `run_cli_killed_after` SIGKILLs one: for the tests where the process is
the point.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import save_tiny_llama, write_jsonl  # noqa: F401  (write_jsonl re-exported)


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory, smollm2_tokenizer):
    """Same tokenizer, another shape (hidden 32, intermediate 96): a different base."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-other"), smollm2_tokenizer,
                      hidden_size=32, intermediate_size=96, num_attention_heads=2, num_key_value_heads=1)


QA_ROWS = [{"instruction": f"What colour is item {i}?", "input": "", "output": f"Item {i} is red."} for i in range(8)]


def one_step_run(root: Path, model_dir) -> Path:
    """A finished one-step run of the tiny model under `root` (its data beside it); returns the run directory."""
    from qlorakit.config import config_from_dict
    from qlorakit.train.loop import train

    data = write_jsonl(root / "train.jsonl", QA_ROWS)
    cfg = config_from_dict({
        "model": {"name": str(model_dir), "dtype": "fp32"}, "quant": {"method": "nf4"},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0}, "data": {"path": str(data), "max_length": 48},
        "train": {"output_dir": str(root / "run"), "max_steps": 1, "batch_size": 2, "save_every": None},
    })
    train(cfg, progress=False)
    return root / "run"


def captured_error_line(capsys, code: int, command: str) -> str:
    """The one error line an in-process `qlorakit COMMAND` printed (exit code 1, no traceback)."""
    stdout, stderr = capsys.readouterr()
    assert code == 1 and "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"qlorakit {command}: error: "), last
    return last


def write_config(path: Path, model, data, output_dir, **sections) -> Path:
    """A small training config for the tiny model (2 steps, batch 2, fp32, nf4)."""
    cfg = {
        "model": {"name": str(model), "dtype": "fp32"},
        "quant": {"method": "nf4"},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"path": str(data), "max_length": 48},
        "train": {"output_dir": str(output_dir), "max_steps": 2, "batch_size": 2, "lr": 1e-3, "warmup_ratio": 0.0,
                  "save_every": None, "log_every": 1},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_cli(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """`python -m qlorakit ARGS` in a subprocess, as a user's shell runs it."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "qlorakit", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


# Runs `qlorakit ARGS` with MODULE's FUNCTION (or Class.method) wrapped so that the process SIGKILLs
# itself right after the wrapped call returns: the crash point is exact and needs no hook in qlorakit.
_KILL_AFTER = """
import importlib, os, signal, sys
owner = importlib.import_module(sys.argv[1])
*path, name = sys.argv[2].split(".")
for part in path:
    owner = getattr(owner, part)
original = getattr(owner, name)
def killed_after(*args, **kwargs):
    original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
setattr(owner, name, killed_after)
from qlorakit.cli import main
sys.exit(main(sys.argv[3:]))
"""


def run_cli_killed_after(module: str, function: str, *args, timeout=300) -> subprocess.CompletedProcess:
    """`qlorakit ARGS`, killed with SIGKILL as soon as `module.function` returns (returncode -9);
    `function` may be dotted (`GGUFWriter.write_ti_data_to_file`)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-c", _KILL_AFTER, module, function, *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)


def assert_cli_error(result, command: str, *needles: str) -> str:
    """Exit 1, no traceback, the last stderr line is the error and names every needle; returns it.
    `result`: a CliResult (tests/conftest.py `cli`) or a subprocess.CompletedProcess."""
    stderr = result.stderr.strip()
    assert result.returncode == 1, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {stderr}"
    assert "Traceback" not in stderr, stderr
    last = stderr.splitlines()[-1] if stderr else ""
    assert last.startswith(f"qlorakit {command}: error: "), stderr
    for needle in needles:
        assert needle in last, f"{needle!r} not in {last!r}"
    return last


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under `roots` (files or directories)."""
    digests = {}
    for root in roots:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests
