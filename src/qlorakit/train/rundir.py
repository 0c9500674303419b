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
"""

from __future__ import annotations

import shutil
from pathlib import Path

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
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            raise RunDirError(f"train.output_dir: {path} cannot be created: {parent} is a file")
    if path.exists() and not path.is_dir():
        raise RunDirError(f"train.output_dir: {path} is a file")
    if resume:
        if not holds_run(path):
            raise RunDirError(f"train.resume: {path} holds no run to resume")
        return
    if holds_run(path) and not overwrite:
        raise RunDirError(
            f"train.output_dir: {path} already holds a run; pass --overwrite to replace it or set train.resume=true to continue it"
        )
    existing = path.exists() and any(path.iterdir())
    if existing and not holds_run(path) and not overwrite:
        raise RunDirError(f"train.output_dir: {path} exists and is not empty; pass --overwrite or choose another directory")


def create_output_dir(path: Path, *, overwrite: bool, resume: bool) -> None:
    """Create (or, with overwrite, empty) the run directory; call after validation passed."""
    if overwrite and not resume and path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
