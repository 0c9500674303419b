"""Matmul peak of this machine, per dtype, in its own process; prints one JSON line.

    python bench/peak.py     # {"bf16_gflops": ..., "fp32_gflops": ...}

The best of several timed (4096 x 1024) @ (1024 x 1024) products after a warm-up: the shape of a
4 x 256-token batch through a 1024-wide projection, large enough to reach the kernel's peak.
"""

from __future__ import annotations

import json
import time

import torch

SHAPE = (4096, 1024, 1024)  # (tokens, in, out)


def gflops(dtype: torch.dtype, repeats: int = 10, slow_seconds: float = 1.0) -> float:
    """The best of `repeats` timed products; one, when the warm-up product takes over `slow_seconds`
    (bf16 on a CPU that emulates it: about 12 s a product on an AVX2-only CPU)."""
    m, k, n = SHAPE
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    start = time.perf_counter()
    a @ b
    if time.perf_counter() - start > slow_seconds:
        repeats = 1
    else:
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e9


if __name__ == "__main__":
    print(json.dumps({"bf16_gflops": round(gflops(torch.bfloat16), 1), "fp32_gflops": round(gflops(torch.float32), 1),
                      "threads": torch.get_num_threads()}))
