"""Issue #9: `qlorakit merge` on bad inputs: one line naming the problem, no output, inputs unchanged."""

from __future__ import annotations

import shutil

import pytest

from qlorakit.config import config_from_dict
from qlorakit.train.loop import train
from tests.reliability.conftest import QA_ROWS, assert_cli_error, run_cli, snapshot, write_jsonl


def _train(model_dir, data, out):
    cfg = config_from_dict({
        "model": {"name": str(model_dir), "dtype": "fp32"}, "quant": {"method": "nf4"},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0}, "data": {"path": str(data), "max_length": 48},
        "train": {"output_dir": str(out), "max_steps": 1, "batch_size": 2, "save_every": None},
    })
    train(cfg, progress=False)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, other_model_dir):
    root = tmp_path_factory.mktemp("runs")
    data = write_jsonl(root / "train.jsonl", QA_ROWS)
    return _train(tiny_model_dir, data, root / "a"), _train(other_model_dir, data, root / "b")


def _copy_run(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def test_adapter_for_another_base(runs, tmp_path):
    run_a, run_b = runs
    run = _copy_run(run_a, tmp_path)
    shutil.copy(run_b / "adapter" / "adapter_model.safetensors", run / "adapter" / "adapter_model.safetensors")
    out = tmp_path / "merged"
    before = snapshot(run)
    last = assert_cli_error(run_cli("merge", run, "--out", out), "merge", "lora_", "another base")
    assert "base_model.model.model.layers." in last  # the tensor is named
    assert not out.exists() and not list(tmp_path.glob(".merged*"))
    assert snapshot(run) == before


def test_truncated_adapter_file(runs, tmp_path):
    run = _copy_run(runs[0], tmp_path)
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    out = tmp_path / "merged"
    assert_cli_error(run_cli("merge", run, "--out", out), "merge", "adapter_model.safetensors")
    assert not out.exists()


def test_not_a_run(tmp_path):
    out = tmp_path / "merged"
    assert_cli_error(run_cli("merge", tmp_path / "nowhere", "--out", out), "merge", "nowhere")
    assert not out.exists()


# --out is checked before the model is loaded: with bf16 (unfaithful on this tiny fp32 run) a late
# check would be hidden behind the fidelity refusal.
DTYPES = ["fp32", pytest.param("bf16", id="bf16-checked-before-merging")]


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_under_a_regular_file(runs, tmp_path, dtype):
    run = _copy_run(runs[0], tmp_path)
    blocker = tmp_path / "afile"
    blocker.write_text("keep\n")
    assert_cli_error(run_cli("merge", run, "--out", blocker / "merged", "--dtype", dtype), "merge", "afile")
    assert blocker.read_text() == "keep\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "run"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_not_empty_needs_overwrite(runs, tmp_path, dtype):
    run = _copy_run(runs[0], tmp_path)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "mine.txt").write_text("mine\n")
    assert_cli_error(run_cli("merge", run, "--out", out, "--dtype", dtype), "merge", str(out), "--overwrite")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "run"]
