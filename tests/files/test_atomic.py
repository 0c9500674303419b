"""files/atomic.py: an output appears whole or not at all, and a failed write leaves the old one
as it was with no temporary file or directory beside it."""

import errno
import os
from pathlib import Path

import pytest

from qlorakit.files import atomic
from qlorakit.files.atomic import (
    OutputWriteError, check_output_dir, check_output_file, move_into_place, staged_directory, staged_file,
    write_json_atomic, write_text_atomic,
)


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_write_text_atomic_replaces_the_file(tmp_path):
    path = tmp_path / "sub" / "config.yaml"
    write_text_atomic(path, "a: 1\n")
    write_text_atomic(path, "a: 2\n")
    assert path.read_text() == "a: 2\n"
    assert os.listdir(path.parent) == ["config.yaml"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()  # open()'s mode, not mkstemp's 0o600


def test_a_failed_single_file_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    write_json_atomic(path, {"old": True})
    monkeypatch.setattr(atomic.os, "fsync", _disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_json_atomic(path, {"new": True})
    assert path.read_text() == '{\n  "old": true\n}\n'
    assert os.listdir(tmp_path) == ["report.json"]


def test_a_failed_rename_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"old")
    monkeypatch.setattr(atomic.os, "replace", _disk_full)
    with pytest.raises(OSError):
        with staged_file(path) as tmp:
            tmp.write_bytes(b"new")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["model.gguf"]


def test_staged_file_removes_its_temporary_when_the_writer_fails(tmp_path):
    path = tmp_path / "model.gguf"
    with pytest.raises(ValueError):
        with staged_file(path) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".model.gguf.tmp-")
            tmp.write_bytes(b"half")
            raise ValueError("writer failed")
    assert os.listdir(tmp_path) == []


def test_staged_directory_replaces_the_old_directory_only_when_complete(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with staged_directory(out) as staging:
        assert out.exists() and staging.parent == tmp_path and staging.name.startswith(".merged.tmp-")
        (staging / "new.txt").write_text("new")
    assert os.listdir(out) == ["new.txt"]
    assert os.listdir(tmp_path) == ["merged"]  # no .merged.tmp-* or .merged.old-* left
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask()  # mkdir()'s mode, not mkdtemp's 0o700


def test_a_failed_directory_write_keeps_the_old_directory_and_leaves_no_staging(tmp_path, monkeypatch):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OSError, match="No space left"):
        with staged_directory(out) as staging:
            (staging / "part.safetensors").write_bytes(b"half")
            _disk_full()
    assert os.listdir(out) == ["old.txt"] and os.listdir(tmp_path) == ["merged"]


def test_a_failed_rename_of_a_directory_keeps_the_old_one(tmp_path, monkeypatch):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_replace = os.replace
    calls = []

    def second_rename_fails(src, dst):  # moving the old aside works, publishing the new one does not
        calls.append(Path(dst))
        if len(calls) == 2:
            _disk_full()
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", second_rename_fails)
    with pytest.raises(OSError):
        with staged_directory(out) as staging:
            (staging / "new.txt").write_text("new")
    assert calls[1] == out
    assert os.listdir(out) == ["old.txt"]  # moved aside, then put back
    assert os.listdir(tmp_path) == ["merged"]  # no .merged.old-* or .merged.tmp-* left


def test_staged_directory_without_replace_keeps_an_entry_written_meanwhile(tmp_path):
    out = tmp_path / "cache-entry"
    with staged_directory(out, replace=False) as staging:
        out.mkdir()
        (out / "theirs").write_text("complete")
        (staging / "mine").write_text("complete")
    assert os.listdir(out) == ["theirs"] and os.listdir(tmp_path) == ["cache-entry"]


def test_move_into_place_takes_the_place_of_an_empty_directory(tmp_path):
    staging, out = tmp_path / ".out.tmp-x", tmp_path / "out"
    staging.mkdir()
    (staging / "f").write_text("x")
    out.mkdir()
    move_into_place(staging, out)
    assert os.listdir(out) == ["f"] and os.listdir(tmp_path) == ["out"]


def test_output_directory_refusals(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(OutputWriteError, match=f"{a_file}: exists and is a file"):
        check_output_dir(a_file, overwrite=True)
    with pytest.raises(OutputWriteError, match=f"{a_file / 'out'}: cannot be created: {a_file} is a file"):
        check_output_dir(a_file / "out", overwrite=True)
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    with pytest.raises(OutputWriteError, match="exists and is not empty; choose another --out or pass --overwrite"):
        check_output_dir(full, overwrite=False)
    check_output_dir(full, overwrite=True)
    check_output_dir(tmp_path / "new" / "dir", overwrite=False)


def test_output_file_refusals(tmp_path):
    with pytest.raises(OutputWriteError, match=f"{tmp_path}: is a directory; --out must name the file to write"):
        check_output_file(tmp_path, overwrite=True)
    existing = tmp_path / "m.gguf"
    existing.write_bytes(b"x")
    with pytest.raises(OutputWriteError, match=f"{existing}: exists; choose another --out or pass --overwrite"):
        check_output_file(existing, overwrite=False)
    check_output_file(existing, overwrite=True)
    with pytest.raises(OutputWriteError, match="cannot be created"):
        check_output_file(existing / "m.gguf", overwrite=True)
