"""Learning-rate schedules as pure functions of the step (1-based), nanoGPT style.

    warmup:   lr · step / warmup_steps                         for step <= warmup_steps
    constant: lr
    linear:   lr · (total - step) / (total - warmup_steps)
    cosine:   lr · ½ (1 + cos(π · (step - warmup_steps) / (total - warmup_steps)))

warmup_steps = ceil(warmup_ratio · total). A pure function needs no scheduler state in a
checkpoint: the step alone restores it.
"""

from __future__ import annotations

import math


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(warmup_ratio * total_steps)


def lr_at(step: int, *, lr: float, total_steps: int, schedule: str, warmup_ratio: float) -> float:
    warmup = warmup_steps(total_steps, warmup_ratio)
    if step <= warmup:
        return lr * step / warmup
    if schedule == "constant":
        return lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    if schedule == "linear":
        return lr * max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"train.schedule: unknown schedule {schedule!r} (constant, linear, cosine)")
