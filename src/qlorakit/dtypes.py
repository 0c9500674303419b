"""The three dtype names used in configs and on the command line, and their torch dtypes."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def to_torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The config name of a torch dtype (torch.bfloat16 -> "bf16")."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"{dtype} has no qlorakit dtype name; use one of {', '.join(map(str, DTYPES.values()))}")


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matmul instructions (AVX512-BF16 or AMX); without them torch
    emulates bf16 matmuls, about 3x slower than fp32 (measured on this project's CI machine)."""
    flags = _cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def matmul_is_native(dtype: str, device: str | torch.device = "cpu") -> bool:
    """Whether `dtype` matmuls run on hardware instructions on `device`: always on CUDA and for
    fp32; on the CPU, bf16 needs AVX512-BF16 or AMX-BF16 and fp16 AVX512-FP16 or AMX-FP16.
    Elsewhere torch emulates them: 0.8 GFLOPS against 18.6 for fp32 at (64, 576) @ (576, 1536)
    on a 2-core AVX2 CPU."""
    if dtype == "fp32" or torch.device(device).type == "cuda":
        return True
    flags = _cpu_flags()
    wanted = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}[dtype]
    return any(flag in flags for flag in wanted)


def preferred_dtype() -> str:
    """bf16 on CUDA and on CPUs with native bf16, fp32 on other CPUs (faster there)."""
    if torch.cuda.is_available() or cpu_has_native_bf16():
        return "bf16"
    return "fp32"
