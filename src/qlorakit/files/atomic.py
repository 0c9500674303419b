"""Outputs that appear whole or not at all, and the checks made before writing one.

    staged_directory(out)     write into a hidden sibling `.{name}.tmp-XXXX`; on success it is renamed
                              to `out` (an old `out` removed only after that), on any error removed
    new_staging_dir(out)      that hidden sibling alone, for a writer that renames it itself
    move_into_place(s, out)   that rename on its own
    staged_file(path)         the same for one file: `.{name}.tmp-XXXX` beside it, renamed to `path`
    write_text_atomic(p, t)   one file under a temporary name, flushed, then renamed
    write_json_atomic(p, d)   the same for a JSON object
    check_output_dir(out)     refuse a file, a path under a file, or a non-empty directory without overwrite
    check_output_file(out)    refuse a directory, a path under a file, or a file without overwrite
    check_creatable(out)      refuse a path under a file
    check_disk_space(out, n)  refuse when the file system has less than n bytes free

An interrupted write therefore leaves no output that looks complete: at most a hidden directory
or file named as temporary. What appears gets the mode `open()` and `mkdir()` would have given it
(0o666 / 0o777 less the umask), not the 0o600 / 0o700 of tempfile's private names.
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


def check_creatable(out: str | os.PathLike) -> None:
    """Refuse an output (file or directory) whose path runs through a file."""
    out = Path(out)
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise OutputWriteError(f"{out}: cannot be created: {parent} is a file; choose another --out")


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an output directory that is a file, lies under a file, or holds something and may not be replaced."""
    out = Path(out)
    check_creatable(out)
    if out.exists() and not out.is_dir():
        raise OutputWriteError(f"{out}: exists and is a file; choose another output directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputWriteError(f"{out}: exists and is not empty; choose another --out or pass --overwrite")


def check_output_file(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an output file that is a directory, lies under a file, or exists and may not be replaced."""
    out = Path(out)
    check_creatable(out)
    if out.is_dir():
        raise OutputWriteError(f"{out}: is a directory; --out must name the file to write")
    if out.exists() and not overwrite:
        raise OutputWriteError(f"{out}: exists; choose another --out or pass --overwrite")


def move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished directory `staging` to `out`; an old `out` is moved aside first, removed
    only after that, and put back if the rename fails."""
    if not out.exists():
        os.replace(staging, out)
        return
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
        os.replace(staging, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.replace(out, old / out.name)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(old / out.name, out)  # the old output back where it was
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


def new_staging_dir(out: str | os.PathLike) -> Path:
    """A fresh hidden directory `.{name}.tmp-XXXX` beside `out` (created with its parents) to write `out` into."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0o700; give the directory mkdir()'s mode
    return staging


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield a staging directory beside `out`; it becomes `out` when the block ends normally and is
    removed when it raises.

    replace: False keeps an `out` that exists when the block ends (a cache entry another process
        wrote meanwhile: readers may be using it) and removes the staging directory instead.
    """
    out = Path(out)
    staging = new_staging_dir(out)
    try:
        yield staging
        if replace or not out.exists():
            move_into_place(staging, out)
        else:
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path `.{name}.tmp-XXXX` beside `path` (an empty file, its directory created);
    whatever the block writes there is renamed to `path` when it ends normally, and removed when it
    raises. For writers that take a file name (safetensors, gguf-py); the bytes are not fsynced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(handle)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0o600; give the file open()'s mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` under a temporary name in the same directory, flushed to disk, then rename:
    readers see the old file or the new one, never a part."""
    with staged_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    """`payload` as indented JSON, written as `write_text_atomic` writes."""
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def _umask() -> int:
    """The process umask: from /proc (Linux), else by setting it and setting it back, which for an
    instant would give files other threads create the mode 0o666 (there is no portable getter)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o077)
    os.umask(umask)
    return umask
