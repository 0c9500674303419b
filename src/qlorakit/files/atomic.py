"""Outputs that appear whole or not at all, and the checks made before writing one.

    staged_directory(out)     write into a hidden sibling `.{name}.tmp-XXXX`; on success it is renamed
                              to `out` (an old `out` removed only after that), on any error removed
    move_into_place(s, out)   that rename on its own
    write_text_atomic(p, t)   one file under a temporary name, flushed, then renamed
    write_json_atomic(p, d)   the same for a JSON object
    check_output_dir(out)     refuse a file, or a non-empty directory without overwrite
    check_disk_space(out, n)  refuse when the file system has less than n bytes free

An interrupted write therefore leaves no output that looks complete: at most a hidden directory
or file named as temporary.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


class OutputWriteError(OSError):
    """An output cannot be written: it exists (and may not be replaced), or the disk is too full."""


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def existing_ancestor(path: Path) -> Path:
    """`path` itself, or its nearest parent that exists."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def check_disk_space(out: Path, needed: int, what: str = "the output") -> None:
    """Raise OutputWriteError if the file system `out` would be written to has less than `needed` bytes free."""
    where = existing_ancestor(Path(out).parent)
    free = shutil.disk_usage(where).free
    if free < needed:
        raise OutputWriteError(
            f"{out}: not enough disk space: {what} needs about {format_bytes(needed)}, {where} has {format_bytes(free)} free"
        )


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output directory that is a file, or that holds something and may not be replaced."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputWriteError(f"{out}: exists and is a file; choose another output directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputWriteError(f"{out}: exists and is not empty; choose another --out or pass --overwrite")


def move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished directory `staging` to `out`; an old `out` is removed only after that."""
    if not out.exists():
        os.replace(staging, out)
        return
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
        os.replace(staging, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.replace(out, old / out.name)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def new_staging_dir(out: Path) -> Path:
    """A fresh hidden directory beside `out` (created with its parents) to write `out` into."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging directory beside `out`; it becomes `out` when the block ends normally and is
    removed when it raises."""
    out = Path(out)
    staging = new_staging_dir(out)
    try:
        yield staging
        move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` under a temporary name in the same directory, flushed to disk, then rename:
    readers see the old file or the new one, never a part."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    """`payload` as indented JSON, written as `write_text_atomic` writes."""
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")
