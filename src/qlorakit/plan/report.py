"""`qlorakit plan`: the command's library entry point and its table."""

from __future__ import annotations

import re

from qlorakit.config import Config
from qlorakit.plan.advice import advise
from qlorakit.plan.baseline import BaselineProbe
from qlorakit.plan.estimate import RSS_BASE, Plan, estimate, format_size
from qlorakit.plan.shapes import model_shapes

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> int:
    """'24GiB', '24 GB', '80g', '1.5TiB' -> bytes (GB = 10^9, GiB = 2^30)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text or "")
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"--gpu-memory: cannot read {text!r}; write a size such as 24GiB, 80GB or 16000MiB")
    return int(float(match.group(1)) * _UNITS[unit])


def plan_config(cfg: Config, gpu_memory: int | None = None, processes: int = 1, fsdp: bool = False) -> Plan:
    """The plan of `cfg`: on CUDA when `gpu_memory` is given, else the CPU process (peak RSS)."""
    if processes < 1:
        raise ValueError(f"--processes: must be at least 1, got {processes}")
    device = "cpu" if gpu_memory is None else "cuda"
    probe = BaselineProbe(cfg.model.name) if device == "cpu" else None  # runs while the shapes are read
    try:
        shapes = model_shapes(cfg)
    except BaseException:
        if probe is not None:
            probe.stop()
        raise
    baseline, baseline_note = RSS_BASE, None
    if probe is not None:
        try:
            measured = probe.result()
            baseline, baseline_note = measured.bytes, f"process baseline {format_size(measured.bytes)} {measured.how}"
        except RuntimeError as error:
            baseline_note = f"process baseline {format_size(RSS_BASE)} as calibrated, not measured ({error})"
    plan = estimate(cfg, shapes, device, processes, fsdp, rss_base=baseline)
    plan.gpu_memory = gpu_memory
    if gpu_memory is not None:
        plan.fits = plan.peak_bytes <= gpu_memory
    plan.advice = advise(cfg, shapes, plan) if plan.fits is False or gpu_memory is None else []
    mode = ("FSDP: decoder layers' quantized weights, adapters, gradients and optimizer sharded, 16-bit weights whole, over"
            if fsdp else "DDP: nothing divided over")
    plan.assumptions = [
        f"every row fills data.max_length={cfg.data.max_length} (padding to the longest row of a batch)",
        f"{mode} {processes} process(es); per-device micro-batch train.batch_size={cfg.train.batch_size}",
        f"CPU: whole-process peak RSS incl. the {baseline_note}" if device == "cpu"
        else "CUDA: device memory only (host baseline excluded), incl. CUDA context",
    ]
    return plan


def suggest_config(cfg: Config, out: str, gpu_memory: int | None = None, processes: int = 1, fsdp: bool = False,
                   overwrite: bool = False):
    """`plan --suggest OUT.yaml`: the config that fits (plan/suggest.py), written to `out`."""
    from pathlib import Path

    from qlorakit.config import save_config
    from qlorakit.plan.shapes import model_shapes
    from qlorakit.plan.suggest import suggest

    if Path(out).exists() and not overwrite:
        raise ValueError(f"--suggest {out}: exists; choose another path or pass --overwrite")
    if gpu_memory is not None:
        budget, source = gpu_memory, "--gpu-memory, one CUDA device"
    else:
        import psutil

        budget, source = psutil.virtual_memory().available, "this machine's free memory now"
    first = plan_config(cfg, gpu_memory, processes, fsdp)
    suggestion = suggest(cfg, model_shapes(cfg), first, budget, source, processes, fsdp)
    suggestion.plan.assumptions = first.assumptions
    save_config(suggestion.config, out)
    return suggestion



_LABELS = {
    "quantized_weights": "quantized weights", "dense_weights": "16-bit weights (embeddings, norms, head)",
    "adapters": "adapters (fp32)", "gradients": "adapter gradients (fp32)", "optimizer": "optimizer states",
    "activations": "activations", "loss": "logits + cross-entropy", "transient": "dequantized weight + grad buffers",
    "recompute": "layer rebuilt in backward (beyond loss)", "gathered_layers": "decoder layers gathered by FSDP (2)",
    "allocator_slack": "allocator slack (calibrated)", "framework": "framework (torch, transformers, tokenizer)",
}


def format_plan(plan: Plan) -> str:
    """The plan as a table, then fit and advice."""
    where = "CPU process (peak RSS)" if plan.device == "cpu" else f"per GPU, {plan.processes} process(es)"
    lines = [
        f"plan         {plan.model}: batch {plan.batch_size} x {plan.max_length} tokens, {plan.dtype}, "
        f"checkpointing {'on' if plan.gradient_checkpointing else 'off'}, {where}{', FSDP' if plan.fsdp else ''}",
        "",
        f"{'part':<46}{'memory':>14}",
    ]
    for key, value in plan.parts.items():
        label = "CUDA context" if key == "framework" and plan.device != "cpu" else _LABELS.get(key, key)
        lines.append(f"{label:<46}{format_size(value):>14}")
        if key == "quantized_weights":
            for fmt, nbytes in plan.weights_by_format.items():
                lines.append(f"  {fmt:<44}{format_size(nbytes // (plan.processes if plan.fsdp else 1)):>14}")
    lines += [
        f"{'training step':<46}{format_size(plan.train_bytes):>14}",
    ]
    if plan.device == "cpu":
        lines.append(f"{'loading (dense model before quantizing)':<46}{format_size(plan.load_bytes):>14}")
    lines += [
        f"{'peak':<46}{format_size(plan.peak_bytes):>14}",
        f"activations: {format_size(plan.activations_without_checkpointing)} without checkpointing, "
        f"{format_size(plan.activations_with_checkpointing)} with",
    ]
    if plan.gpu_memory is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"{verdict} in {format_size(plan.gpu_memory)} ({100 * plan.peak_bytes / plan.gpu_memory:.0f}%)")
    if plan.advice:
        lines += ["", "to save memory (most first):"]
        for a in plan.advice:
            fits = "" if a["fits"] is None else ("  fits" if a["fits"] else "  still too big")
            lines.append(f"  {a['change']:<60} -{format_size(a['saves_bytes']):>12} -> {format_size(a['peak_bytes'])}{fits}")
    lines += ["", "assumes: " + "; ".join(plan.assumptions)]
    return "\n".join(lines)
