"""Fix glibc's mmap threshold for a training run on the CPU (glibc only).

glibc's malloc serves allocations above a threshold with mmap and frees them with munmap, and
raises that threshold dynamically (up to 32 MiB) each time such a block is freed, so where a
tensor lands depends on the run's history. qlorakit fixes it for the run:

    bf16, with or without activation checkpointing: 32 MiB ("reuse"). Activation tensors
           (1-10 MiB on SmolLM2) come from the heap and reuse freed memory. A fresh mmap block
           is zero-filled by the kernel page by page; on SmolLM2 4 x 256 a step allocates about
           3 GiB of such tensors, and at bf16 speed that costs a third of the step: 2.0 s
           against 2.7 s per step, peak RSS 1.79 GiB against 1.37 GiB after 12 steps (heap
           fragmentation grows over the first steps, then holds). With checkpointing the heap
           pays as well: `make bench` measured 345-399 tokens/s at 914-968 MiB on the heap and
           257 tokens/s at 801 MiB at 1 MiB (SmolLM2 4 x 256).
    otherwise (fp32, fp16): 1 MiB ("return"). Every tensor of 1 MiB or more is mmapped and given
           back when freed, so the peak tracks the live tensors. In fp32 the heap would cost
           900 MiB more peak (2.9 against 2.0 GiB on SmolLM2 4 x 256) for a few percent of speed.

In the "reuse" mode the heap also keeps what is freed at its top (trim threshold 1 GiB instead of
glibc's 128 KiB). Otherwise every free of a tensor at the top of the heap hands its pages back and
the next step faults them in again, zero-filled: SmolLM2 4 x 256 took 35,000-50,000 page faults
(150-200 MB of fresh pages) in each of steps 2-5 and 1.93 s per step on average, against under
3,000 and 1.85 s with the top kept (three interleaved pairs of runs). The peak is the heap's
high-water mark either way (1,544-1,561 MiB in both).

Measured with `bench/train_worker.py` (tokens/s, peak RSS) and mallinfo2 per step; `qlorakit
plan` is calibrated on both modes (plan/estimate.py, allocator_slack). A user's own
`MALLOC_MMAP_THRESHOLD_` (or `MALLOC_TRIM_THRESHOLD_`) in the environment wins and is left alone;
other C libraries too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
REUSE_THRESHOLD_BYTES = 32 << 20  # glibc's own ceiling for the dynamic threshold (64-bit)
RETURN_THRESHOLD_BYTES = 1 << 20
KEEP_FREED_BYTES = 1 << 30  # trim threshold in the reuse mode: the heap's top is kept, not handed back


def mmap_threshold_for(dtype: str, checkpointing: bool = False) -> int:
    """The threshold qlorakit fixes for a run in compute dtype `dtype` (module docstring); the same
    with or without `checkpointing`, which is accepted so callers need not know that."""
    return REUSE_THRESHOLD_BYTES if dtype == "bf16" else RETURN_THRESHOLD_BYTES


GLIBC_DEFAULT_THRESHOLD_BYTES = 128 << 10  # glibc's initial mmap and trim thresholds


def fix_mmap_threshold(dtype: str, checkpointing: bool = False) -> bool:
    """Set glibc's mmap threshold for a run in compute dtype `dtype` (disabling its dynamic
    growth); True if it was set. Not on other systems, and not when MALLOC_MMAP_THRESHOLD_ is set:
    the user chose."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        threshold = mmap_threshold_for(dtype, checkpointing)
        if threshold == REUSE_THRESHOLD_BYTES and "MALLOC_TRIM_THRESHOLD_" not in os.environ:
            libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # musl and others have no mallopt: nothing to tune
        return False


def restore_malloc_defaults() -> bool:
    """Put glibc's mmap and trim thresholds back to their initial values (128 KiB each), after
    `fix_mmap_threshold`; True if done. glibc has no call that turns its dynamic mmap threshold
    back on, so the threshold stays fixed at 128 KiB, where a fresh process starts. A user's
    MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ were never overridden and are left alone."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
            libc.mallopt(M_TRIM_THRESHOLD, GLIBC_DEFAULT_THRESHOLD_BYTES)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, GLIBC_DEFAULT_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
