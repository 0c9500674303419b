"""`qlorakit plan CONFIG --suggest OUT.yaml`: choose the parameters that make a run fit its memory.

The budget is `--gpu-memory` (one CUDA device) or, without it, the memory this machine has free
now (psutil's `available`). The target is `TARGET_SHARE` of it: `plan` is calibrated to about ±15 %
on the CPU (docs/plan.md), so a plan at 90 % leaves room for its error.

    1. adapter.r from the model's size (`rank_for`), unless the config's r is smaller
    2. the largest micro-batch that divides the effective batch (train.batch_size × train.grad_accum,
       kept) and fits, with train.grad_accum making up the rest
    3. then, while the plan does not fit, in this order: train.gradient_checkpointing on (same
       result, about a third more compute), train.optimizer adamw8bit (8-bit states), adapter.r
       halved (to 4 at least), data.max_length halved (to 256 at least: rows get truncated)
    4. a micro-batch of 1 that still does not fit is an error naming the smallest plan found

Each change is reported with what it saves and what it costs. The rule for r:

    parameters   < 1 B    1 B – 13 B    > 13 B
    adapter.r       32        16            8

LoRA's rank need not grow with the model: Aghajanyan et al. 2020 (arXiv 2012.13255) find that the
intrinsic dimension of fine-tuning falls as models grow, and Hu et al. 2021 (LoRA, arXiv
2106.09685, Table 6) adapt GPT-3 175B with r = 1–8 on the attention projections; on all linear
layers QLoRA (Dettmers et al. 2023, arXiv 2305.14314) reports that the rank matters little once
every layer is adapted. Small models get the larger ranks, which cost them little memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from qlorakit.config import Config
from qlorakit.plan.estimate import Plan, estimate, format_size
from qlorakit.plan.shapes import ModelShapes

TARGET_SHARE = 0.9
MIN_RANK = 4
MIN_MAX_LENGTH = 256


def rank_for(parameters: int) -> int:
    """adapter.r for a base of `parameters` weights (module docstring)."""
    if parameters < 1_000_000_000:
        return 32
    return 16 if parameters <= 13_000_000_000 else 8


@dataclass
class Suggestion:
    """The chosen config, its plan, the budget and every change made, with its saving and cost."""

    config: Config
    plan: Plan
    budget_bytes: int
    budget_source: str
    changes: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"budget_bytes": self.budget_bytes, "budget_source": self.budget_source,
                "target_bytes": int(self.budget_bytes * TARGET_SHARE), "peak_bytes": self.plan.peak_bytes,
                "fits": self.plan.peak_bytes <= self.budget_bytes * TARGET_SHARE, "changes": self.changes}


class NoFittingPlan(ValueError):
    """Even the smallest configuration the search reaches does not fit the budget."""


def _with(cfg: Config, section: str, **values) -> Config:
    return replace(cfg, **{section: replace(getattr(cfg, section), **values)})


def suggest(cfg: Config, shapes: ModelShapes, first: Plan, budget: int, budget_source: str, processes: int = 1,
            fsdp: bool = False) -> Suggestion:
    """Search the parameters for `cfg` (module docstring); `first` is `cfg`'s own plan (its
    framework part is the measured baseline that every re-estimate keeps)."""
    target = int(budget * TARGET_SHARE)
    device = first.device

    def plan_of(candidate: Config) -> Plan:
        return estimate(candidate, shapes, device, processes, fsdp, rss_base=first.parts["framework"])

    changes: list[dict] = []
    current, current_plan = cfg, first

    def change(key: str, value, candidate: Config, cost: str) -> None:
        nonlocal current, current_plan
        new_plan = plan_of(candidate)
        changes.append({"key": key, "from": _value(current, key), "to": value, "cost": cost,
                        "peak_before": current_plan.peak_bytes, "peak_after": new_plan.peak_bytes})
        current, current_plan = candidate, new_plan

    rank = min(cfg.adapter.r, rank_for(shapes.parameters)) if cfg.adapter.kind != "vera" else cfg.adapter.r
    if rank != cfg.adapter.r:
        change("adapter.r", rank, _with(cfg, "adapter", r=rank, alpha=cfg.adapter.alpha * rank / cfg.adapter.r),
               f"rank for a model of {shapes.parameters / 1e9:.2f} B parameters (alpha scaled with it)")
    effective = cfg.train.batch_size * cfg.train.grad_accum
    micro = _largest_fitting_micro_batch(current, effective, plan_of, target)
    if micro != current.train.batch_size:
        cost = "fewer optimizer-step passes" if micro > current.train.batch_size else "more passes per optimizer step"
        change("train.batch_size", micro, _with(current, "train", batch_size=micro, grad_accum=effective // micro),
               f"train.grad_accum {effective // micro} keeps the effective batch {effective}; {cost}")
    remedies = [
        ("train.gradient_checkpointing", lambda c: not c.train.gradient_checkpointing,
         lambda c: (True, _with(c, "train", gradient_checkpointing=True)), "about a third more compute per step; same result"),
        ("train.optimizer", lambda c: c.train.optimizer == "adamw",
         lambda c: ("adamw8bit", _with(c, "train", optimizer="adamw8bit")), "8-bit optimizer states (bitsandbytes)"),
        ("adapter.r", lambda c: c.adapter.r > MIN_RANK and c.adapter.kind != "vera",
         lambda c: (c.adapter.r // 2, _with(c, "adapter", r=c.adapter.r // 2, alpha=c.adapter.alpha / 2)),
         "a smaller update space (alpha halved with it: same scale)"),
        ("data.max_length", lambda c: c.data.max_length > MIN_MAX_LENGTH,
         lambda c: (max(MIN_MAX_LENGTH, c.data.max_length // 2), _with(c, "data", max_length=max(MIN_MAX_LENGTH, c.data.max_length // 2))),
         "longer rows are truncated"),
    ]
    for key, applies, apply, cost in remedies:
        while current_plan.peak_bytes > target and applies(current):
            value, candidate = apply(current)
            change(key, value, candidate, cost)
        if current_plan.peak_bytes <= target:
            break
        micro = _largest_fitting_micro_batch(current, effective, plan_of, target)  # a smaller plan may fit a larger micro-batch
        if micro != current.train.batch_size:
            change("train.batch_size", micro, _with(current, "train", batch_size=micro, grad_accum=effective // micro),
                   f"train.grad_accum {effective // micro} keeps the effective batch {effective}")
    if current_plan.peak_bytes > target:
        raise NoFittingPlan(
            f"--suggest: no configuration fits {TARGET_SHARE:.0%} of {format_size(budget)} ({budget_source}); the smallest "
            f"reached needs {format_size(current_plan.peak_bytes)} (batch 1, checkpointing, adamw8bit, r {current.adapter.r}, "
            f"max_length {current.data.max_length}): a smaller model, more memory, or FSDP over more GPUs"
        )
    current_plan.gpu_memory = first.gpu_memory
    current_plan.fits = True
    return Suggestion(current, current_plan, budget, budget_source, changes)


def _largest_fitting_micro_batch(cfg: Config, effective: int, plan_of, target: int) -> int:
    """The largest divisor of `effective` whose plan fits `target` (1 when none does)."""
    for micro in sorted((d for d in range(1, effective + 1) if effective % d == 0), reverse=True):
        if plan_of(_with(cfg, "train", batch_size=micro, grad_accum=effective // micro)).peak_bytes <= target:
            return micro
    return 1


def _value(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)



def format_suggestion(s: Suggestion, out: str) -> str:
    """The changes as a table, the resulting peak against the budget, and where the config went."""
    lines = [f"budget       {format_size(s.budget_bytes)} ({s.budget_source}); target {TARGET_SHARE:.0%}: {format_size(int(s.budget_bytes * TARGET_SHARE))}", ""]
    if s.changes:
        lines.append(f"{'change':<40}{'peak before':>14}{'peak after':>14}  cost")
        for c in s.changes:
            lines.append(f"{c['key'] + ': ' + str(c['from']) + ' -> ' + str(c['to']):<40}{format_size(c['peak_before']):>14}"
                         f"{format_size(c['peak_after']):>14}  {c['cost']}")
    else:
        lines.append("the config fits as it is; no change")
    lines += ["", f"planned peak {format_size(s.plan.peak_bytes)} ({100 * s.plan.peak_bytes / s.budget_bytes:.0f}% of the budget)",
              f"wrote {out}: qlorakit train {out}  (qlorakit plan {out} re-plans it)"]
    return "\n".join(lines)
