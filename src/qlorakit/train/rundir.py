"""The run directory: what a training run writes, and the rules for reusing one.

    <output_dir>/config.yaml          resolved config
    <output_dir>/quantization.json    see qlorakit.metadata
    <output_dir>/metrics.jsonl        one JSON object per logged step (and per validation)
    <output_dir>/loss.png             training and validation loss
    <output_dir>/adapter/             peft-format adapter
    <output_dir>/checkpoints/step-N/  resumable checkpoints
    <output_dir>/merged/              when merge.after_train is true

A directory that already holds a run is refused unless the user passes --overwrite or sets
train.resume: true. Nothing is created until every input has been validated, so a failed
start leaves no directory that looks like a run.

While a run writes the directory it holds its lock, `<output_dir>/.lock` (files/lock.py):
`claim_output_dir` takes it before anything else, so a second run on the directory is refused at
once, naming the process that holds it. The lock file is created with the directory when the
directory is new, and both go again if the run stops before writing anything else.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from qlorakit.files.lock import LOCK_NAME, DirectoryInUseError, lock_directory

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "adapter", "checkpoints")


class RunDirError(ValueError):
    """The output directory cannot be used as asked."""


def holds_run(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in RUN_MARKERS)


def check_output_dir(path: Path, *, overwrite: bool, resume: bool, inputs: dict[str, str] | None = None) -> None:
    """Validate `path` before anything is written (raises RunDirError naming the problem).

    inputs: config key -> path the run reads (data.path, model.name); --overwrite empties `path`
    first, so an input inside it is refused rather than deleted.
    """
    if overwrite and not resume and path.exists():
        for key, value in (inputs or {}).items():
            resolved = Path(value).expanduser().resolve()
            if resolved == path.resolve() or path.resolve() in resolved.parents:
                raise RunDirError(
                    f"train.output_dir: --overwrite would delete {key} {value}, which is inside {path}; "
                    "move it or choose another output directory"
                )
    _check_creatable(path)
    if resume:
        if not holds_run(path):
            raise RunDirError(f"train.resume: {path} holds no run to resume")
        return
    if holds_run(path) and not overwrite:
        raise RunDirError(
            f"train.output_dir: {path} already holds a run; pass --overwrite to replace it or set train.resume=true to continue it"
        )
    existing = path.exists() and any(p.name != LOCK_NAME for p in path.iterdir())
    if existing and not holds_run(path) and not overwrite:
        raise RunDirError(f"train.output_dir: {path} exists and is not empty; pass --overwrite or choose another directory")


def _check_creatable(path: Path) -> None:
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            raise RunDirError(f"train.output_dir: {path} cannot be created: {parent} is a file")
    if path.exists() and not path.is_dir():
        raise RunDirError(f"train.output_dir: {path} is a file")


@contextmanager
def claim_output_dir(path: Path, *, overwrite: bool, resume: bool, inputs: dict[str, str] | None = None,
                     lock: bool = True) -> Iterator[None]:
    """`check_output_dir` with `path` locked for this process until the block exits (module docstring).

    The lock comes before the checks, so a directory another run is writing is refused as in use
    (not as "already holds a run", which --overwrite would not cure). lock=False validates only:
    under torchrun every rank validates and rank 0, the one that writes, holds the lock.

    Raises:
        RunDirError: the checks fail, or another process holds the lock (naming its pid and command).
    """
    with ExitStack() as held:
        if lock:
            _check_creatable(path)
            try:
                held.enter_context(lock_directory(path, create=True))
            except DirectoryInUseError as error:
                raise RunDirError(f"train.output_dir: {error}") from None
        check_output_dir(path, overwrite=overwrite, resume=resume, inputs=inputs)
        yield


def create_output_dir(path: Path, *, overwrite: bool, resume: bool) -> None:
    """Create (or, with overwrite, empty) the run directory; call after validation passed.
    Emptying keeps the lock file: the lock lives on it (files/lock.py)."""
    if overwrite and not resume and path.exists():
        for child in path.iterdir():
            if child.name == LOCK_NAME:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    path.mkdir(parents=True, exist_ok=True)
