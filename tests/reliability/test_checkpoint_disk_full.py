"""Disk full while a checkpoint is written: one line naming the file, the step and the last complete
checkpoint; that checkpoint stays intact and no partial step directory is left.

The full disk is simulated by making the writer raise what it raises on ENOSPC: safetensors'
SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), or an
OSError(ENOSPC) from a plain write or fsync."""

from __future__ import annotations

import errno
import hashlib

import pytest
import torch
from safetensors import SafetensorError

from qlorakit.cli import main
from qlorakit.train import checkpoint as ckpt
from tests.reliability.conftest import QA_ROWS, write_config, write_jsonl

SAFETENSORS_ENOSPC = "Error while serializing: I/O error: No space left on device (os error 28)"


def _optimizer():
    weight = torch.nn.Parameter(torch.ones(4, 3))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    weight.sum().backward()
    optimizer.step()
    return {"base_model.model.x.lora_A.weight": weight.detach().clone()}, optimizer


def _full_disk_at(monkeypatch, file_name: str, error: Exception) -> None:
    """The next write of `file_name` (safetensors' save_file, or its fsync) raises `error`."""
    real_save, real_fsync, real_open = ckpt.save_file, ckpt.os.fsync, open
    names = {}

    def save_file(tensors, filename, *args, **kwargs):
        if filename.endswith(file_name):
            raise error
        return real_save(tensors, filename, *args, **kwargs)

    def fsync(fd):
        if names.get(fd, "").endswith(file_name):
            raise error
        return real_fsync(fd)

    def tracking_open(path, *args, **kwargs):  # fsync gets a descriptor: remember whose it is
        handle = real_open(path, *args, **kwargs)
        names[handle.fileno()] = str(path)
        return handle

    monkeypatch.setattr(ckpt, "save_file", save_file)
    monkeypatch.setattr(ckpt.os, "fsync", fsync)
    monkeypatch.setattr(ckpt, "open", tracking_open, raising=False)  # shadows the builtin in checkpoint.py only


CASES = {
    "adapter-safetensors": ("adapter_model.safetensors", SafetensorError(SAFETENSORS_ENOSPC)),
    "optimizer-safetensors": ("optimizer.safetensors", SafetensorError(SAFETENSORS_ENOSPC)),
    "optimizer-oserror": ("optimizer.safetensors", OSError(errno.ENOSPC, "No space left on device")),
    "state-json-fsync": ("state.json", OSError(errno.ENOSPC, "No space left on device")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_disk_full_keeps_the_last_checkpoint(case, tmp_path, monkeypatch):
    file_name, error = CASES[case]
    adapter, optimizer = _optimizer()
    first = ckpt.save_checkpoint(tmp_path, 10, adapter, optimizer.state_dict(), {"epoch": 0, "index": 1})
    adapter_bytes = hashlib.sha256((first / "adapter_model.safetensors").read_bytes()).hexdigest()
    _full_disk_at(monkeypatch, file_name, error)
    with pytest.raises(ckpt.CheckpointWriteError) as raised:
        ckpt.save_checkpoint(tmp_path, 20, adapter, optimizer.state_dict(), {"epoch": 0, "index": 2})
    monkeypatch.undo()
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"step 20: cannot write the checkpoint file {tmp_path / 'checkpoints' / 'step-20' / file_name}: "
                              "No space left on device"), message
    assert f"last complete checkpoint: {first} (intact" in message and "train.resume=true" in message, message
    assert "Error while serializing" not in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-10"]  # no partial step-20, no temporary
    assert ckpt.latest_checkpoint(tmp_path) == first
    assert hashlib.sha256((first / "adapter_model.safetensors").read_bytes()).hexdigest() == adapter_bytes
    step, state, optimizer_state, position = ckpt.load_checkpoint(first)
    _optimizer()[1].load_state_dict(optimizer_state)
    assert step == 10 and position == {"epoch": 0, "index": 1} and torch.equal(state["base_model.model.x.lora_A.weight"],
                                                                               adapter["base_model.model.x.lora_A.weight"])


def test_disk_full_before_any_checkpoint_says_none_yet(tmp_path, monkeypatch):
    adapter, optimizer = _optimizer()
    _full_disk_at(monkeypatch, "adapter_model.safetensors", SafetensorError(SAFETENSORS_ENOSPC))
    with pytest.raises(ckpt.CheckpointWriteError, match=r"^step 5: .*No space left on device \(os error 28\); last complete checkpoint: none yet$"):
        ckpt.save_checkpoint(tmp_path, 5, adapter, optimizer.state_dict(), {"epoch": 0, "index": 0})
    monkeypatch.undo()
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_train_on_a_full_disk_names_the_checkpoint_and_resumes(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """`qlorakit train` in-process: step 2's checkpoint hits a full disk; the error is one line
    naming step-2's file and step-1; a resume afterwards continues from step-1."""
    out = tmp_path / "run"
    data = write_jsonl(tmp_path / "train.jsonl", QA_ROWS)
    config = write_config(tmp_path / "config.yaml", tiny_model_dir, data, out, train={"max_steps": 3, "save_every": 1})
    real_save = ckpt.save_file

    def save_file(tensors, filename, *args, **kwargs):
        if "/.step-2.tmp-" in filename:
            raise SafetensorError(SAFETENSORS_ENOSPC)
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    code = main(["train", str(config), "--no-progress"])
    stderr = capsys.readouterr().err
    assert code == 1 and "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    checkpoints = out / "checkpoints"
    assert last == (f"qlorakit train: error: step 2: cannot write the checkpoint file {checkpoints / 'step-2' / 'adapter_model.safetensors'}: "
                    f"No space left on device (os error 28); last complete checkpoint: {checkpoints / 'step-1'} (intact: free "
                    "some space, then resume from it with train.resume=true)"), last
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-1"]

    monkeypatch.undo()  # space freed
    assert main(["train", str(config), "--no-progress", "train.resume=true"]) == 0
    assert f"resumed from {checkpoints / 'step-1'}" in capsys.readouterr().err
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-1", "step-2", "step-3"]
