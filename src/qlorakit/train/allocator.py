"""Give freed activation memory back to the operating system during training (glibc only).

glibc's malloc serves allocations above a threshold with mmap and frees them with munmap, but it
raises that threshold dynamically (up to 32 MiB) each time such a block is freed; after the
first backward pass most activation tensors (1–10 MiB each) then come from the heap, whose freed
space stays in the process. Fixing the threshold at 1 MiB keeps every tensor of that size on
mmap, so the peak resident size tracks the live tensors: on SmolLM2 4 x 256, fp32, the whole-
process peak is 1.9 GiB with it and 2.8 GiB with a 32 MiB threshold (`make bench`, rows qlorakit
and qlorakit_heap; `MALLOC_MMAP_THRESHOLD_` has the same effect from the environment). The price
is page faults on every fresh tensor: 132–140 instead of 145–168 tokens/s there (two runs)
(quantized weights and dropped-out inputs already live in reused buffers, see quant/linear.py
`scratch_buffer`). qlorakit takes the predictable memory (`qlorakit plan` is calibrated on it);
a user who prefers the speed sets the threshold in the environment, e.g.
`MALLOC_MMAP_THRESHOLD_=33554432`, which this function then leaves alone.
Other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_MMAP_THRESHOLD = -3  # <malloc.h>
MMAP_THRESHOLD_BYTES = 1 << 20


def return_freed_memory_to_os() -> bool:
    """Set glibc's mmap threshold to 1 MiB (disabling its dynamic growth); True if it was set.
    Not on other systems, and not when MALLOC_MMAP_THRESHOLD_ is set: the user chose."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # musl and others have no mallopt: nothing to tune
        return False
