"""The three dtype names used in configs and on the command line, and their torch dtypes."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def to_torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matmul instructions (AVX512-BF16 or AMX); without them torch
    emulates bf16 matmuls, about 3x slower than fp32 (measured on this project's CI machine)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def preferred_dtype() -> str:
    """bf16 on CUDA and on CPUs with native bf16, fp32 on other CPUs (faster there)."""
    if torch.cuda.is_available() or cpu_has_native_bf16():
        return "bf16"
    return "fp32"
