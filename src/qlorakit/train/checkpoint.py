"""Atomic, resumable checkpoints without pickle.

    checkpoints/step-N/
        adapter_model.safetensors   adapter tensors (peft names)
        optimizer.safetensors       every tensor of the optimizer state, flattened
        state.json                  step, data position, optimizer scalars and param groups
        rng.safetensors             torch CPU (and CUDA) generator states

Everything is written into checkpoints/.step-N.tmp-XXXX, made durable (fsync of each file and of
the directory) and renamed to step-N at the end, so a crash mid-write never leaves a directory that
looks complete; `latest_checkpoint` ignores temporaries and the next save or resume removes them.
Tensors go through safetensors and structure through JSON: resuming never unpickles.
A write that fails (disk full, quota, I/O error) leaves the earlier checkpoints as they were and
raises CheckpointWriteError: one line naming the file, the step and the last complete checkpoint.

Resuming is exact: with the adapter, the optimizer state (AdamW moments and step counts, bit for
bit), the RNG states (adapter dropout) and the data position restored, and the learning rate a
function of the step, a run killed at any point and resumed ends with the same adapter bits as an
uninterrupted one (tests/reliability/test_crash_resume.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qlorakit.files.atomic import move_into_place, new_staging_dir

_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, quota, I/O error); earlier ones are intact."""


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (safetensors) and a JSON skeleton where each
    tensor is replaced by {"__tensor__": key}. Works for any nesting (torch AdamW, bitsandbytes'
    8-bit AdamW with its quantization maps)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value, path: str):
        if torch.is_tensor(value):
            tensors[path] = value.detach().cpu().contiguous().clone()
            return {"__tensor__": path}
        if isinstance(value, dict):
            return {"__dict__": [[walk(k, f"{path}.k{i}"), walk(v, f"{path}.{i}")] for i, (k, v) in enumerate(value.items())]}
        if isinstance(value, (list, tuple)):
            return {"__list__": [walk(v, f"{path}.{i}") for i, v in enumerate(value)], "tuple": isinstance(value, tuple)}
        return value

    return tensors, walk(state_dict, "s")


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], skeleton) -> dict:
    def build(value):
        if isinstance(value, dict) and "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if isinstance(value, dict) and "__dict__" in value:
            return {build(k): build(v) for k, v in value["__dict__"]}
        if isinstance(value, dict) and "__list__" in value:
            items = [build(v) for v in value["__list__"]]
            return tuple(items) if value.get("tuple") else items
        return value

    return build(skeleton)


def save_checkpoint(run_dir: Path, step: int, adapter_state: dict, optimizer_state: dict, data_position: dict) -> Path:
    """Write checkpoints/step-`step` atomically; returns its path.

    Raises:
        CheckpointWriteError: a file could not be written (the temporary directory is removed, the
            checkpoints already there are untouched); the message names the file, the step and the
            last complete checkpoint.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step}"
    writing = final
    staging = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_staging(root)
        staging = new_staging_dir(final)  # checkpoints/.step-N.tmp-XXXX
        writing = final / "adapter_model.safetensors"  # named by where it is published: the staging name is gone after
        save_file(adapter_state, str(staging / writing.name))
        tensors, rest = _flatten_optimizer(optimizer_state)
        writing = final / "optimizer.safetensors"
        save_file(tensors, str(staging / writing.name))
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        writing = final / "rng.safetensors"
        save_file(rng, str(staging / writing.name))
        writing = final / "state.json"
        (staging / writing.name).write_text(json.dumps({"step": step, "data": data_position, "optimizer": rest}, indent=1))
        for path in staging.iterdir():  # make the bytes durable before the rename publishes them
            writing = final / path.name
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        writing = final
        _fsync_dir(staging)
        move_into_place(staging, final)
        _fsync_dir(root)  # ... and the rename itself
        return final
    except (OSError, SafetensorError) as error:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        latest = latest_checkpoint(run_dir)
        kept = f"{latest} (intact: free some space, then resume from it with train.resume=true)" if latest else "none yet"
        raise CheckpointWriteError(
            f"step {step}: cannot write the checkpoint file {writing}: {_reason(error)}; last complete checkpoint: {kept}"
        ) from error
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def _reason(error: BaseException) -> str:
    """What the OS said, without the wrapping: safetensors reports ENOSPC as
    "Error while serializing: I/O error: No space left on device (os error 28)"."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.rsplit("I/O error: ", 1)[-1]


def _fsync_dir(path: Path) -> None:
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:  # a platform without directory handles: the rename is still atomic
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def remove_staging(root: Path) -> None:
    """Delete .step-N.tmp-* (and .step-N.old-*) directories under checkpoints/ left by a process
    killed mid-write or mid-rename (only the run's single writer calls this: before it saves, and
    when it resumes)."""
    for pattern in (".step-*.tmp-*", ".step-*.old-*"):
        for path in Path(root).glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / "state.json").is_file()]
    return max(steps)[1] if steps else None


def load_checkpoint(path: Path) -> tuple[int, dict, dict, dict]:
    """Restore the RNG states; returns (step, adapter_state, optimizer_state, data_position)."""
    path = Path(path)
    remove_staging(path.parent)
    state = json.loads((path / "state.json").read_text())
    optimizer_state = _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    cuda_states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return state["step"], load_file(str(path / "adapter_model.safetensors")), optimizer_state, state["data"]
