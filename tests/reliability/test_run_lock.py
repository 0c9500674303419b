"""A run directory in use is locked (files/lock.py): a second `train` on it fails at once naming the
holder, `merge`/`eval`/`export` of it refuse, and the lock goes with its process, SIGKILL included.

The holder is a small python process that takes the lock and sleeps; the commands run in-process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from qlorakit.cli import main
from qlorakit.config import config_from_dict
from qlorakit.files.lock import LOCK_NAME, DirectoryInUseError, holder_of, lock_directory
from qlorakit.train import loop
from qlorakit.train.rundir import RunDirError, claim_output_dir, create_output_dir
from tests.reliability.conftest import QA_ROWS, captured_error_line, one_step_run, snapshot, write_config, write_jsonl

_HOLD = """
import sys, time
from qlorakit.files.lock import lock_directory
with lock_directory(sys.argv[1], create=True):
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def hold():
    """hold(path) -> a process holding path's lock (killed at teardown)."""
    started = []

    def start(path):
        proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    """A finished one-step run of the tiny model."""
    return one_step_run(tmp_path_factory.mktemp("locked-runs"), tiny_model_dir)


def _no_model_load(monkeypatch):
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loop, "load_model", refuse)
    monkeypatch.setattr("qlorakit.models.restore.load_model", refuse)
    return calls


def test_second_train_fails_at_once_naming_the_holder(tmp_path, tiny_model_dir, hold, monkeypatch, capsys):
    out = tmp_path / "run"
    holder = hold(out)
    config = write_config(tmp_path / "config.yaml", tiny_model_dir, write_jsonl(tmp_path / "train.jsonl", QA_ROWS), out)
    calls = _no_model_load(monkeypatch)
    last = captured_error_line(capsys, main(["train", str(config), "--no-progress"]), "train")
    assert "train.output_dir" in last and str(out) in last and f"pid {holder.pid}" in last and "python -c" in last, last
    assert calls == []  # refused before any model load
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # the holder's, untouched


def test_overwrite_of_a_run_in_use_is_refused_and_deletes_nothing(run_dir, tmp_path, tiny_model_dir, hold, monkeypatch, capsys):
    """A directory that holds a run and is locked: refused as in use (not "already holds a run",
    which --overwrite would not cure), and --overwrite removes nothing."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = snapshot(run)
    holder = hold(run)
    config = write_config(tmp_path / "config.yaml", tiny_model_dir, write_jsonl(tmp_path / "train.jsonl", QA_ROWS), run)
    calls = _no_model_load(monkeypatch)
    last = captured_error_line(capsys, main(["train", str(config), "--overwrite", "--no-progress"]), "train")
    assert f"pid {holder.pid}" in last and "in use" in last and "already holds a run" not in last, last
    assert calls == []
    after = snapshot(run)
    after.pop(str(run / LOCK_NAME))
    assert after == before


def test_lock_is_released_when_its_holder_is_killed(tmp_path, hold):
    path = tmp_path / "run"
    holder = hold(path)
    assert holder_of(path).pid == holder.pid
    with pytest.raises(DirectoryInUseError, match=f"pid {holder.pid}"):
        with lock_directory(path, wait=0):
            pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    assert holder_of(path) is None  # the stale file names nobody: the kernel dropped the lock
    with lock_directory(path, wait=0):
        assert holder_of(path).pid == os.getpid()
    assert holder_of(path) is None and not (path / LOCK_NAME).exists()


@pytest.mark.parametrize("command", ["merge", "eval", "chat", "export"])
def test_reading_a_run_in_use_is_refused(command, run_dir, tmp_path, hold, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "merged").mkdir()  # export reads RUN/merged: refused while RUN is being written
    holder = hold(run)
    data = write_jsonl(tmp_path / "eval.jsonl", QA_ROWS[:2])
    argv = {
        "merge": ["merge", str(run), "--out", str(tmp_path / "merged")],
        "eval": ["eval", str(run), "--data", str(data)],
        "chat": ["chat", str(run), "--prompt", "hi"],
        "export": ["export", str(run / "merged"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")],
    }[command]
    calls = _no_model_load(monkeypatch)
    last = captured_error_line(capsys, main(argv), command)
    assert f"{run} is still being written by pid {holder.pid}" in last, last
    assert calls == [] and not (tmp_path / "merged").exists() and not (tmp_path / "m.gguf").exists()


def test_train_holds_the_lock_while_it_runs_and_removes_it(run_dir, tmp_path, tiny_model_dir, monkeypatch):
    seen = []
    real = loop.load_model

    def load_model(*args, **kwargs):
        seen.append(holder_of(tmp_path / "run"))
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "load_model", load_model)
    cfg = config_from_dict({
        "model": {"name": str(tiny_model_dir), "dtype": "fp32"}, "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"path": str(write_jsonl(tmp_path / "train.jsonl", QA_ROWS)), "max_length": 48},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "batch_size": 2, "save_every": None},
    })
    loop.train(cfg, progress=False)
    assert [h.pid for h in seen] == [os.getpid()]
    assert holder_of(tmp_path / "run") is None and not (tmp_path / "run" / LOCK_NAME).exists()


def test_failed_start_leaves_no_directory(tmp_path):
    out = tmp_path / "a" / "run"
    with pytest.raises(RunDirError, match="holds no run to resume"):
        with claim_output_dir(out, overwrite=False, resume=True):
            pass
    assert not (tmp_path / "a").exists()


def test_other_ranks_validate_without_the_lock(tmp_path, hold):
    """Under torchrun rank 0 holds the lock; rank 1 (lock=False) must still pass validation."""
    out = tmp_path / "run"
    hold(out)
    with claim_output_dir(out, overwrite=False, resume=False, lock=False):
        pass
    with pytest.raises(RunDirError, match="in use by pid"):
        with claim_output_dir(out, overwrite=False, resume=False):
            pass


def test_overwrite_empties_the_directory_but_keeps_the_lock(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    with claim_output_dir(run, overwrite=True, resume=False):
        create_output_dir(run, overwrite=True, resume=False)
        assert [p.name for p in run.iterdir()] == [LOCK_NAME]
        with pytest.raises(DirectoryInUseError):
            with lock_directory(run, wait=0):
                pass
    assert list(run.iterdir()) == []
