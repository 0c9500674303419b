"""train/allocator.py: the mmap threshold a run trains with, checked against glibc itself."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from qlorakit.train.allocator import (
    RETURN_THRESHOLD_BYTES,
    REUSE_THRESHOLD_BYTES,
    fix_mmap_threshold,
    mmap_threshold_for,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")


def test_threshold_by_dtype_and_checkpointing():
    assert mmap_threshold_for("bf16") == REUSE_THRESHOLD_BYTES == 32 << 20
    assert mmap_threshold_for("bf16", checkpointing=True) == REUSE_THRESHOLD_BYTES
    assert mmap_threshold_for("fp32") == mmap_threshold_for("fp16") == RETURN_THRESHOLD_BYTES == 1 << 20
    assert mmap_threshold_for("fp32", checkpointing=True) == RETURN_THRESHOLD_BYTES


def test_a_users_threshold_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(4 << 20))
    assert fix_mmap_threshold("bf16") is False


# The start of every probe: a fresh interpreter without the user's malloc settings, and glibc's
# malloc, free and mallinfo2 (its arena is the heap's size, hblkhd the mmapped bytes).
_PRELUDE = textwrap.dedent("""
    import ctypes, json, os, sys
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        os.environ.pop(name, None)
    from qlorakit.train.allocator import fix_mmap_threshold

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
""")

# In a fresh interpreter (mallopt is process-wide), each case starting where glibc alone would do
# the opposite. fp32: freeing a mmapped 4 MiB block first raises glibc's dynamic threshold to
# 4 MiB, where a 2 MiB block would come from the heap; after the fix it is mmapped (mallinfo2's
# hblkhd grows). bf16: glibc's initial threshold (128 KiB) would mmap it; after the fix it is not.
_PROBE = _PRELUDE + textwrap.dedent("""
    if sys.argv[2] == "raise":
        libc.free(libc.malloc(4 << 20))
    assert fix_mmap_threshold(sys.argv[1], checkpointing=sys.argv[3] == "checkpointing")
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(2 << 20)
    mapped = libc.mallinfo2().hblkhd - before
    libc.free(block)
    print(json.dumps({"mmapped_bytes": mapped}))
""")


@pytest.mark.parametrize("dtype, checkpointing, start, mmapped",
                         [("fp32", "-", "raise", True), ("bf16", "-", "initial", False), ("bf16", "checkpointing", "initial", False),
                          ("fp32", "checkpointing", "raise", True)])
def test_glibc_serves_a_2_mib_block_as_the_threshold_says(dtype, checkpointing, start, mmapped):
    out = subprocess.run([sys.executable, "-c", _PROBE, dtype, start, checkpointing], capture_output=True, text=True, timeout=120)
    if "mallinfo2" in out.stderr:
        pytest.skip("glibc before 2.33 has no mallinfo2")
    assert out.returncode == 0, out.stderr
    mapped = json.loads(out.stdout.strip().splitlines()[-1])["mmapped_bytes"]
    assert (mapped >= 2 << 20) if mmapped else (mapped == 0), mapped


# A freed 16 MiB heap block at the heap's top: handed back to the system (the heap shrinks, as
# mallinfo2's arena shows) under glibc's 128 KiB trim threshold, kept in the reuse mode.
_TRIM_PROBE = _PRELUDE + textwrap.dedent("""
    if sys.argv[1] != "glibc":
        dtype, _, checkpointing = sys.argv[1].partition("-")
        assert fix_mmap_threshold(dtype, checkpointing=bool(checkpointing))
    libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD: the 16 MiB block comes from the heap in every mode
    block = libc.malloc(16 << 20)
    grown = libc.mallinfo2().arena
    libc.free(block)
    print(json.dumps({"heap_given_back": grown - libc.mallinfo2().arena}))
""")


@pytest.mark.parametrize("mode, kept", [("glibc", False), ("bf16", True), ("bf16-checkpointing", True), ("fp32", False)])
def test_the_reuse_mode_keeps_the_heaps_freed_top(mode, kept):
    out = subprocess.run([sys.executable, "-c", _TRIM_PROBE, mode], capture_output=True, text=True, timeout=120)
    if "mallinfo2" in out.stderr:
        pytest.skip("glibc before 2.33 has no mallinfo2")
    assert out.returncode == 0, out.stderr
    given_back = json.loads(out.stdout.strip().splitlines()[-1])["heap_given_back"]
    assert (given_back == 0) if kept else (given_back >= 15 << 20), given_back
