"""Crash safety: `qlorakit train` killed with SIGKILL at random points, then resumed with
train.resume=true until it finishes, writes an adapter bit-identical to an uninterrupted run's, in
fp32 and in bf16 compute (the adapters are fp32 in both). Bit-identical in bf16 too: a resumed run
restores the adapter, the optimizer, the RNG and the data position, and on one thread every step
does the same arithmetic in the same order, so a difference of one bf16 rounding is a resume bug,
not noise.

The kill points are drawn from a seeded RNG (so a failure reproduces) in step space: "once the
process has logged step k, wait d seconds, kill", which lands anywhere in a step, in a checkpoint
write or in the final adapter write. One trial kills inside a checkpoint write on purpose: its
first process writes checkpoints slowly (`checkpoint.save_file` wrapped with a sleep) and is killed
as soon as checkpoints/.step-N.tmp-* appears. Adapter dropout is on, so the RNG state matters, and
the run crosses epochs (reshuffled batches) and the warmup/cosine schedule.

The reference and the three trials run at the same time, each on one thread (OMP_NUM_THREADS=1:
the same arithmetic in every process, and four processes do not fight over two cores).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.reliability.conftest import QA_ROWS, write_config, write_jsonl

STEPS, SAVE_EVERY = 8, 2
KILL_SEED = 20261122
SLOW_CHECKPOINTS = (  # the CLI, with every checkpoint file write made slow enough to kill inside
    "import sys, time\n"
    "from qlorakit.train import checkpoint\n"
    "real = checkpoint.save_file\n"
    "checkpoint.save_file = lambda *a, **k: (time.sleep(0.4), real(*a, **k))[1]\n"
    "from qlorakit.cli import main\n"
    "sys.exit(main())\n"
)


@dataclass(frozen=True)
class Kill:
    """Kill the process `delay` s after it logs step `after_step`, or as soon as it starts writing
    checkpoint `in_checkpoint` (then with the slow-checkpoint wrapper)."""

    after_step: int | None = None
    delay: float = 0.0
    in_checkpoint: int | None = None


def _plan() -> dict[str, list[Kill]]:
    rng = random.Random(KILL_SEED)
    k1, k2 = sorted(rng.sample(range(1, STEPS), 2))
    return {
        "mid-run": [Kill(after_step=rng.randint(1, STEPS - 1), delay=rng.uniform(0.0, 0.4))],
        "in-checkpoint-write": [Kill(in_checkpoint=rng.choice(range(2 * SAVE_EVERY, STEPS + 1, SAVE_EVERY)))],
        "twice": [Kill(after_step=k1, delay=rng.uniform(0.0, 0.4)), Kill(after_step=k2, delay=rng.uniform(0.0, 0.4))],
    }


PACED_STEPS = (  # the CLI, with every step at least 0.5 s long, so a kill planned `delay` <= 0.4 s after
    # step k is logged always lands before the run can finish (tiny-model steps take milliseconds)
    "import sys, time\n"
    "from qlorakit.train import loop\n"
    "real = loop.lr_at\n"
    "loop.lr_at = lambda *a, **k: (time.sleep(0.5), real(*a, **k))[1]\n"
    "from qlorakit.cli import main\n"
    "sys.exit(main())\n"
)


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore",
                OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _logged_steps(metrics: Path, skip_lines: int) -> list[int]:
    if not metrics.is_file():
        return []
    lines = metrics.read_text().splitlines()[skip_lines:]
    return [json.loads(line)["step"] for line in lines if line.strip().endswith("}")]


def _run(config: Path, run_dir: Path, log: Path, resume: bool, kill: Kill | None, deadline: float) -> int:
    """One `qlorakit train` process, killed per `kill`; returns its exit code (-9 when killed)."""
    slow = kill is not None and kill.in_checkpoint is not None
    if slow:
        prefix = [sys.executable, "-c", SLOW_CHECKPOINTS]
    elif kill is not None:
        prefix = [sys.executable, "-c", PACED_STEPS]
    else:
        prefix = [sys.executable, "-m", "qlorakit"]
    argv = [*prefix, "train", str(config), "--no-progress", f"train.resume={str(resume).lower()}"]
    metrics = run_dir / "metrics.jsonl"
    seen = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
    with open(log, "a") as stderr:
        stderr.write(f"$ {' '.join(argv[-4:])}\n")
        stderr.flush()
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr, env=_env())
        try:
            while process.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{run_dir}: training did not finish in time")
                if kill is not None and kill.after_step is not None and any(s >= kill.after_step for s in _logged_steps(metrics, seen)):
                    time.sleep(kill.delay)
                    process.send_signal(signal.SIGKILL)
                elif kill is not None and kill.in_checkpoint is not None and list(
                        (run_dir / "checkpoints").glob(f".step-{kill.in_checkpoint}.tmp-*")):
                    time.sleep(0.2)  # inside the write: the first file is still being written
                    process.send_signal(signal.SIGKILL)
                time.sleep(0.005)
            return process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def _complete_checkpoints(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name.split("-")[1]) for p in root.glob("step-*") if (p / "state.json").is_file())


def _trial(config: Path, run_dir: Path, log: Path, kills: list[Kill], deadline: float) -> list[str]:
    """Run, kill per plan, resume until done; returns what each resume said it resumed from."""
    resumed_from = []
    resume = False
    for kill in [*kills, None]:
        before = _complete_checkpoints(run_dir)
        lines_before = len(log.read_text().splitlines()) if log.is_file() else 0
        code = _run(config, run_dir, log, resume, kill, deadline)
        new_output = log.read_text().splitlines()[lines_before:]
        if kill is None:
            assert code == 0, "\n".join(new_output)
        else:
            assert code == -signal.SIGKILL, f"{run_dir}: finished (exit {code}) before the planned kill {kill}"
            if kill.in_checkpoint is not None:  # the staging directory is there, the checkpoint is not
                assert list((run_dir / "checkpoints").glob(f".step-{kill.in_checkpoint}.tmp-*"))
                assert kill.in_checkpoint not in _complete_checkpoints(run_dir)
        if resume and before:
            expected = f"resumed from {run_dir / 'checkpoints' / f'step-{before[-1]}'}"
            assert expected in new_output, f"{expected!r} not in {new_output}"
            resumed_from.append(expected)
        resume = True
    return resumed_from


def _bits(path: Path) -> dict[str, bytes]:
    return {name: t.contiguous().view(torch.uint8).numpy().tobytes() for name, t in load_file(str(path)).items()}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_sigkill_at_random_points_then_resume_is_bit_identical(tmp_path, tiny_model_dir, dtype):
    data = write_jsonl(tmp_path / "train.jsonl", QA_ROWS)  # 8 rows, batch 2 x accum 2: a new epoch every 2 steps
    plan = _plan()
    deadline = time.monotonic() + 300
    jobs = {}
    with ThreadPoolExecutor(max_workers=len(plan) + 1) as pool:
        for name, kills in [("reference", []), *plan.items()]:
            run_dir = tmp_path / name
            config = write_config(
                tmp_path / f"{name}.yaml", tiny_model_dir, data, run_dir, adapter={"dropout": 0.1},
                train={"max_steps": STEPS, "save_every": SAVE_EVERY, "grad_accum": 2, "warmup_ratio": 0.25},
            )
            values = yaml.safe_load(config.read_text())
            values["model"]["dtype"] = dtype
            config.write_text(yaml.safe_dump(values, sort_keys=False))
            jobs[name] = pool.submit(_trial, config, run_dir, tmp_path / f"{name}.log", kills, deadline)
        results = {name: job.result() for name, job in jobs.items()}

    reference = _bits(tmp_path / "reference" / "adapter" / "adapter_model.safetensors")
    assert reference and all(name.endswith(("lora_A.weight", "lora_B.weight")) for name in reference)
    for name, kills in plan.items():
        run_dir = tmp_path / name
        got = _bits(run_dir / "adapter" / "adapter_model.safetensors")
        assert got.keys() == reference.keys(), name
        differing = [key for key in reference if got[key] != reference[key]]
        assert not differing, f"{name} (kills {kills}): {len(differing)} tensors differ, e.g. {differing[0]}"
        assert _complete_checkpoints(run_dir)[-1] == STEPS
        assert not list((run_dir / "checkpoints").glob(".step-*")), f"{name}: a killed write's staging directory is left"
    assert any(results.values()), "no trial resumed from a checkpoint"
