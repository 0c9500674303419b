"""Dequantization speed of each format on this machine: a 2048 x 768 weight into an fp32 buffer.

    python bench/dequant_speed.py [--threads 2] [--calls 50] [--formats q4_k q6_k q5_0 q8_0 q4_1 nf4]

The call QuantLinear makes for every matmul (forward and backward) during training: the mean
time of `fmt.dequantize(q, torch.float32, out=buffer)` over --calls calls after 5 unmeasured ones.
Prints one line per format.
"""

from __future__ import annotations

import argparse
import time

import torch

from qlorakit.quant.registry import get_format


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--formats", nargs="*", default=["q4_k", "q6_k", "q5_0", "q8_0", "q4_1", "nf4"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weight = torch.randn(2048, 768)
    buffer = torch.empty(2048, 768)
    for name in args.formats:
        fmt = get_format(name)
        q = fmt.quantize(weight)
        for _ in range(5):
            fmt.dequantize(q, torch.float32, out=buffer)
        start = time.perf_counter()
        for _ in range(args.calls):
            fmt.dequantize(q, torch.float32, out=buffer)
        print(f"{name:6s} {(time.perf_counter() - start) / args.calls * 1e3:6.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
