"""What to change when a plan does not fit: each remedy re-estimated, ranked by bytes saved.

Remedies: halve train.batch_size (to 1 at least), halve data.max_length, turn on
train.gradient_checkpointing, adamw8bit, and — only under FSDP, which shards weights, adapters,
gradients and optimizer states — twice the processes. Data-parallel (DDP) processes divide
nothing per device, so "more GPUs" is offered only as FSDP. CPU offload of the optimizer is named
with its saving (the optimizer states) but not modelled further.
"""

from __future__ import annotations

from dataclasses import replace

from qlorakit.config import Config
from qlorakit.plan.estimate import Plan, estimate
from qlorakit.plan.shapes import ModelShapes


def _with(cfg: Config, section: str, **values) -> Config:
    return replace(cfg, **{section: replace(getattr(cfg, section), **values)})


def advise(cfg: Config, shapes: ModelShapes, plan: Plan) -> list[dict]:
    """Remedies [{change, peak_bytes, saves_bytes, fits}], most saving first."""
    t, device, n = cfg.train, plan.device, plan.processes
    options: list[tuple[str, Config, int, bool]] = []
    if t.batch_size > 1:
        options.append((f"train.batch_size={max(1, t.batch_size // 2)} (train.grad_accum={t.grad_accum * 2} keeps the batch)",
                        _with(cfg, "train", batch_size=max(1, t.batch_size // 2), grad_accum=t.grad_accum * 2), n, plan.fsdp))
    if cfg.data.max_length > 64:
        options.append((f"data.max_length={cfg.data.max_length // 2}", _with(cfg, "data", max_length=cfg.data.max_length // 2),
                        n, plan.fsdp))
    if not t.gradient_checkpointing:
        options.append(("train.gradient_checkpointing=true", _with(cfg, "train", gradient_checkpointing=True), n, plan.fsdp))
    if t.optimizer == "adamw":
        options.append(("train.optimizer=adamw8bit", _with(cfg, "train", optimizer="adamw8bit"), n, plan.fsdp))
    if device != "cpu":
        gpus = n if n > 1 and not plan.fsdp else max(2, 2 * n)  # shard over the GPUs DDP already uses, else twice as many
        options.append((f"FSDP over {gpus} GPUs (train.distributed=fsdp; configs/accelerate/fsdp-qlora.yaml)", cfg,
                        gpus, True))
    out = []
    for change, changed, processes, fsdp in options:
        p = estimate(changed, shapes, device, processes, fsdp, rss_base=plan.parts["framework"])
        out.append({"change": change, "peak_bytes": p.peak_bytes, "saves_bytes": plan.peak_bytes - p.peak_bytes,
                    "fits": None if plan.gpu_memory is None else p.peak_bytes <= plan.gpu_memory})
    if device != "cpu":
        saved = plan.parts["optimizer"]
        out.append({"change": "offload optimizer states to CPU (DeepSpeed/FSDP offload; not modelled beyond this)",
                    "peak_bytes": plan.peak_bytes - saved, "saves_bytes": saved,
                    "fits": None if plan.gpu_memory is None else plan.peak_bytes - saved <= plan.gpu_memory})
    return sorted((o for o in out if o["saves_bytes"] > 0), key=lambda o: -o["saves_bytes"])
