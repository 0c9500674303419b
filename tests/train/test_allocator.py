"""qlorakit/allocator.py: the mmap threshold a run trains with, checked against glibc itself.

Each probe runs in a fresh interpreter (mallopt is process-wide) and asks glibc where a block
landed: heap or mmap (mallinfo2's hblkhd is the mmapped bytes, arena the heap's size).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from qlorakit.allocator import RETURN_THRESHOLD_BYTES, REUSE_THRESHOLD_BYTES, fix_mmap_threshold, mmap_threshold_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")


def test_threshold_by_dtype():
    assert mmap_threshold_for("bf16") == REUSE_THRESHOLD_BYTES == 32 << 20
    assert mmap_threshold_for("fp32") == mmap_threshold_for("fp16") == RETURN_THRESHOLD_BYTES == 1 << 20


def test_a_users_threshold_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(4 << 20))
    assert fix_mmap_threshold("bf16") is False


# The start of every probe: a fresh interpreter without the user's malloc settings, and glibc's
# malloc, free and mallinfo2.
_PRELUDE = textwrap.dedent("""
    import ctypes, json, os, sys
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        os.environ.pop(name, None)
    from qlorakit.allocator import fix_mmap_threshold, restore_malloc_defaults

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]

    def setup(mode):
        # "glibc": untouched; "<dtype>": fixed for a run in dtype; "<dtype>-restored": fixed, then put back.
        dtype, _, then = mode.partition("-")
        if dtype != "glibc":
            assert fix_mmap_threshold(dtype)
        if then == "restored":
            assert restore_malloc_defaults()
""")


def _probe(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PRELUDE + textwrap.dedent(script), *args], capture_output=True,
                         text=True, timeout=120)
    if "mallinfo2" in out.stderr:
        pytest.skip("glibc before 2.33 has no mallinfo2")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


# fp32: freeing a mmapped 4 MiB block first raises glibc's dynamic threshold to 4 MiB, where a 2 MiB
# block would come from the heap; fixed at 1 MiB it is mmapped (hblkhd grows). bf16: glibc's
# initial threshold (128 KiB) would mmap it; fixed at 32 MiB it comes from the heap. Restored, it
# is mmapped again, at the 128 KiB where a fresh process starts.
_MMAP_PROBE = """
    if sys.argv[2] == "raise":
        libc.free(libc.malloc(4 << 20))
    setup(sys.argv[1])
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(2 << 20)
    mapped = libc.mallinfo2().hblkhd - before
    libc.free(block)
    print(json.dumps({"mmapped_bytes": mapped}))
"""


@pytest.mark.parametrize("mode, start, mmapped", [
    ("fp32", "raise", True), ("bf16", "initial", False), ("fp16", "raise", True), ("bf16-restored", "initial", True),
])
def test_glibc_serves_a_2_mib_block_as_the_threshold_says(mode, start, mmapped):
    mapped = _probe(_MMAP_PROBE, mode, start)["mmapped_bytes"]
    assert (mapped >= 2 << 20) if mmapped else (mapped == 0), mapped


# A freed 16 MiB heap block at the heap's top: handed back to the system (the heap shrinks) under
# glibc's 128 KiB trim threshold, kept in bf16's reuse mode, handed back again once restored.
_TRIM_PROBE = """
    setup(sys.argv[1])
    libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD: the 16 MiB block comes from the heap in every mode
    block = libc.malloc(16 << 20)
    grown = libc.mallinfo2().arena
    libc.free(block)
    print(json.dumps({"heap_given_back": grown - libc.mallinfo2().arena}))
"""


@pytest.mark.parametrize("mode, kept", [("glibc", False), ("bf16", True), ("fp32", False), ("bf16-restored", False)])
def test_the_reuse_mode_keeps_the_heaps_freed_top(mode, kept):
    given_back = _probe(_TRIM_PROBE, mode)["heap_given_back"]
    assert (given_back == 0) if kept else (given_back >= 15 << 20), given_back
