"""A directory in use: an OS file lock on `<dir>/.lock`, so two processes never write one run.

    writer   lock_directory(dir)    flock(LOCK_EX) on <dir>/.lock, held by an open descriptor;
                                    the file says who holds it: {"pid", "host", "command", "since"}
    reader   check_not_in_use(dir)  refuses while a writer holds the lock, naming it

Why flock on a descriptor rather than a pid file: the kernel drops the lock when the descriptor
closes, which happens on every exit, SIGKILL and power loss included, so a lock is never stale and
nothing has to guess whether a recorded pid is still alive. The file's text only names the holder
in the message of the process that was refused.

The writer removes the lock file when it lets go (while still holding it). A process that opened
the file just before is then holding an unlinked file; `_acquire` checks, after each lock it gets,
that the descriptor is still the file at `<dir>/.lock` and starts over if not, so at most one
process ever holds the live file.

Where fcntl does not exist (Windows), `lock_directory` locks nothing and `check_not_in_use`
passes: the run still works, unguarded.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

LOCK_NAME = ".lock"
_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class Holder:
    """Who holds a directory's lock, as its lock file says (any field may be unknown)."""

    pid: int | None = None
    host: str | None = None
    command: str | None = None

    def __str__(self) -> str:
        if self.pid is None:
            return "another process"
        where = f" on {self.host}" if self.host and self.host != socket.gethostname() else ""
        return f"pid {self.pid}{where}" + (f" ({self.command})" if self.command else "")


class DirectoryInUseError(RuntimeError):
    """Another process holds the directory's lock."""

    def __init__(self, message: str, path: Path, holder: Holder):
        super().__init__(message)
        self.path, self.holder = path, holder


@contextmanager
def lock_directory(path: str | os.PathLike, *, create: bool = False, wait: float = 0.5) -> Iterator[Path]:
    """Hold `<path>/.lock` exclusively for the `with` block; yields `path`.

    create: make `path` (and missing parents) first; the directories made here are removed again
        on exit if nothing but the lock file was put in them (a run that failed before it started).
    wait: seconds to retry a lock someone else holds, so that a reader's momentary shared lock
        (`check_not_in_use`) never refuses a writer; a real holder outlasts it.

    Raises:
        DirectoryInUseError: another process holds the lock, named from its lock file.
    """
    path = Path(path)
    created = _make_dirs(path) if create else []
    try:
        fd = _acquire(path, wait)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield path
    finally:
        if fd is not None:
            try:  # unlink while still holding it (module docstring)
                os.unlink(path / LOCK_NAME)
            except OSError:
                pass
            os.close(fd)  # releases the lock
        _remove_empty(created)


def holder_of(path: str | os.PathLike) -> Holder | None:
    """The process holding `<path>/.lock`, or None when no process does."""
    lock_path = Path(path) / LOCK_NAME
    if fcntl is None:
        return None
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # momentary: taken and dropped at once
        except BlockingIOError:
            return read_holder(lock_path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def check_not_in_use(*paths: str | os.PathLike) -> None:
    """Refuse to read a directory another process is writing (each of `paths`, in order).

    Raises:
        DirectoryInUseError: "<path> is still being written by pid N (command); ...".
    """
    for path in paths:
        holder = holder_of(path)
        if holder is not None:
            raise DirectoryInUseError(
                f"{path} is still being written by {holder}; wait until it finishes (or stop it) and try again",
                Path(path), holder,
            )


def read_holder(lock_path: str | os.PathLike) -> Holder:
    """The holder a lock file names; fields it does not give (an empty or garbled file) are None."""
    try:
        info = json.loads(Path(lock_path).read_text())
    except (OSError, ValueError):
        return Holder()
    if not isinstance(info, dict):
        return Holder()
    pid = info.get("pid")
    return Holder(pid if isinstance(pid, int) else None, info.get("host"), info.get("command"))


def _acquire(path: Path, wait: float) -> int | None:
    """Open, lock and describe `<path>/.lock`; returns the descriptor that holds it (None: no fcntl)."""
    if fcntl is None:
        return None
    lock_path = path / LOCK_NAME
    deadline = time.monotonic() + wait
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                holder = read_holder(lock_path)
                raise DirectoryInUseError(
                    f"{path} is in use by {holder}; wait until it finishes (or stop it), or choose another directory",
                    path, holder,
                ) from None
            time.sleep(_POLL_SECONDS)
            continue
        except BaseException:
            os.close(fd)
            raise
        if _is_file_at(fd, lock_path):
            break
        os.close(fd)  # the holder we waited for unlinked it: lock the file that is there now
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command_line(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    return fd


def _is_file_at(fd: int, path: Path) -> bool:
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (here.st_dev, here.st_ino)


def _command_line(limit: int = 300) -> str:
    """This process's command as a user typed it: `qlorakit train c.yaml`, not `.../__main__.py train c.yaml`."""
    argv = list(sys.argv) or [""]
    head = Path(argv[0]).name
    if head == "__main__.py":  # python -m qlorakit
        head = Path(argv[0]).parent.name
    elif head in ("-c", ""):
        head = "python " + head if head else "python"
    line = shlex.join([head, *argv[1:]])
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _make_dirs(path: Path) -> list[Path]:
    """mkdir -p `path`; returns the directories this call made, outermost first."""
    missing = []
    for directory in [path, *path.parents]:
        if directory.exists():
            break
        missing.append(directory)
    made = []
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:  # made meanwhile by another process: not ours to remove
            continue
        made.append(directory)
    return made


def _remove_empty(directories: list[Path]) -> None:
    """rmdir the innermost first; stop at the first that is not empty (or gone)."""
    for directory in reversed(directories):
        try:
            directory.rmdir()
        except OSError:
            return
