"""Fidelity report: does the merged model behave like the adapter model it came from?

Each probe prompt (through the tokenizer's chat template when it has one, with the assistant
turn opened) is run through both models, each in its own dtype; the next-token logits at every
prompt position t = 1..T are cast to fp32 and compared, pooled over all positions of all prompts:

    max_abs_logit_diff     = max_{t,v} |z_ref[t,v] − z_cand[t,v]|
    mean_kl                = mean_t Σ_v p_ref[t,v] (log p_ref[t,v] − log p_cand[t,v])   (KL(ref ‖ cand), nats)
    greedy_token_agreement = mean_t [argmax_v z_ref[t] = argmax_v z_cand[t]]
    generations_equal      = the greedy continuations (max_new_tokens, stopping at EOS) of every
                             prompt are the same token ids; the reference decodes step by step,
                             the candidate is checked against it in one pass (`verify_batch`) and
                             decodes step by step only where its continuation differs

Agreement is measured on the prompt positions (teacher-forced), so one early divergence does not
decide every later position; the generations then show whether the divergences matter.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from qlorakit.generation import (
    cache_kwargs, chat_prompt_ids, decode_batch, output_cache, pad_token_id, prefill, stop_token_ids, user_turn,
)

DEFAULT_PROBES = (
    "What is the capital of France?",
    "Explain in one sentence what a prime number is.",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "How do I boil an egg?",
)


class UnfaithfulMergeError(ValueError):
    """The merged model's greedy tokens agree with the adapter model's less often than required."""


@dataclass
class ProbeRow:
    """One prompt: its position count, figures over its positions, and both generations."""

    prompt: str
    positions: int
    max_abs_logit_diff: float
    greedy_token_agreement: float
    reference_generation: str
    candidate_generation: str
    generation_equal: bool


@dataclass
class FidelityReport:
    """Figures of the module docstring; `rows` holds one ProbeRow per prompt."""

    max_abs_logit_diff: float
    mean_kl: float
    greedy_token_agreement: float
    generations_equal: bool
    positions: int
    max_new_tokens: int
    rows: list[ProbeRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def format_table(self, reference: str = "adapter model", candidate: str = "merged model") -> str:
        equal = sum(row.generation_equal for row in self.rows)
        lines = [
            f"fidelity: {candidate} against {reference}, {len(self.rows)} prompts, {self.positions} positions",
            f"  max |logit difference|      {self.max_abs_logit_diff:.4g}",
            f"  mean KL(ref || cand)        {self.mean_kl:.4g} nats",
            f"  greedy-token agreement      {self.greedy_token_agreement:.4f}",
            f"  greedy generations equal    {'yes' if self.generations_equal else 'no'} ({equal}/{len(self.rows)})",
            "",
            f"  {'prompt':<32} {'agree':>6} {'same':>4}  {reference} | {candidate}",
        ]
        for row in self.rows:
            lines.append(
                f"  {_clip(row.prompt, 32):<32} {row.greedy_token_agreement:>6.3f} {'yes' if row.generation_equal else 'no':>4}"
                f"  {_clip(row.reference_generation, 40)!r} | {_clip(row.candidate_generation, 40)!r}"
            )
        return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def probe_set(training_prompts: Sequence[str] = (), max_training: int = 8) -> list[str]:
    """Up to `max_training` distinct training prompts followed by DEFAULT_PROBES.

    Generic questions are there because a model trained hard on one example answers unrelated
    questions with it too (DESIGN.md); the training prompts alone would not show that.
    """
    prompts = list(dict.fromkeys(p for p in training_prompts if p))[:max_training]
    return prompts + [p for p in DEFAULT_PROBES if p not in prompts]


@contextlib.contextmanager
def _eval_mode(*models: nn.Module):
    """Eval mode (no dropout) inside the block; each model's own mode restored after."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def probe_batch(
    model: nn.Module, batch: list[list[int]], max_new_tokens: int, stop_ids: set[int], pad_id: int
) -> tuple[list[Tensor], list[list[int]]]:
    """Per prompt: fp32 logits over its positions (T_i, vocab) and its greedy continuation, the
    prompts decoded together by generation.py's `decode_batch` (left-padded, KV cache)."""
    return decode_batch(model, batch, max_new_tokens, stop_ids, pad_id, keep_prompt_logits=True)


@torch.no_grad()
def verify_batch(
    model: nn.Module, batch: list[list[int]], continuations: list[list[int]], pad_id: int
) -> tuple[list[Tensor], list[bool]]:
    """Per prompt: fp32 logits over its positions (as `probe_batch`) and whether `model`'s greedy
    continuation is the given one, checked in one pass instead of one step per token.

    With the continuation g fed after the prompt p (KV cache), the model's greedy continuation is
    g exactly when argmax z(p + g[:j]) = g[j] for every j < len(g): by induction each greedy step
    then picks g[j], and g ends where the reference stopped (EOS or max_new_tokens), which the
    model's own decoding would reach at the same token. This is how speculative decoding checks a
    draft. Rows are right-padded to the longest g; what follows a row's end is ignored.
    """
    out, _, mask, positions, prompt_logits = prefill(model, batch, pad_id, keep_prompt_logits=True)
    longest = max((len(g) for g in continuations), default=0)
    if longest == 0:
        return prompt_logits, [True] * len(batch)
    predicted = out.logits[:, -1].float().argmax(dim=-1)[:, None]  # (B, 1): predicts g[0]
    if longest > 1:
        fed = torch.full((len(batch), longest - 1), pad_id, dtype=torch.long)  # (B, n - 1): g[:-1]
        for row, g in enumerate(continuations):
            fed[row, : max(len(g) - 1, 0)] = torch.tensor(g[:-1], dtype=torch.long)
        fed = fed.to(mask.device)
        mask = torch.cat([mask, mask.new_ones(len(batch), longest - 1)], dim=1)  # (B, W + n - 1)
        steps = torch.arange(1, longest, device=positions.device)  # (n - 1,)
        later = model(input_ids=fed, attention_mask=mask, position_ids=positions[:, -1:] + steps, use_cache=True,
                      **cache_kwargs(model, output_cache(out))).logits  # (B, n - 1, V)
        predicted = torch.cat([predicted, later.float().argmax(dim=-1)], dim=1)  # (B, n): [:, j] predicts g[j]
    return prompt_logits, [predicted[row, : len(g)].tolist() == g for row, g in enumerate(continuations)]


def _stop_ids(tokenizer, model: nn.Module) -> set[int]:
    return set(stop_token_ids(tokenizer, model))


@dataclass
class ProbeOutputs:
    """One model's answers to a probe set: per prompt, fp32 logits over its positions (T_i, V) and
    its greedy continuation (token ids). Computed once for the adapter model, it serves every
    candidate compared with it (`fidelity_report(..., reference=...)`)."""

    prompts: list[str]
    encoded: list[list[int]]
    logits: list[Tensor]
    generations: list[list[int]]
    stop_ids: set[int]
    max_new_tokens: int


def run_probes(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 16,
    use_chat_template: bool = True,
    batch_size: int = 8,
    stop_ids: set[int] | None = None,
) -> ProbeOutputs:
    """`model` (in eval mode, its mode restored after) on `prompts`, `batch_size` at a time
    (left-padded, see `probe_batch`); stops at `stop_ids` (default: the tokenizer's and the model's EOS).

    Raises:
        ValueError: no prompts, or a prompt that encodes to no tokens.
    """
    if not prompts:
        raise ValueError("fidelity report: no probe prompts")
    stop = _stop_ids(tokenizer, model) if stop_ids is None else stop_ids
    pad_id = pad_token_id(tokenizer)
    encoded = [chat_prompt_ids(tokenizer, user_turn(prompt), use_chat_template) for prompt in prompts]
    for prompt, ids in zip(prompts, encoded):
        if not ids:
            raise ValueError(f"fidelity report: prompt {prompt!r} encodes to no tokens")
    logits: list[Tensor] = []
    generations: list[list[int]] = []
    with _eval_mode(model):
        for start in range(0, len(encoded), batch_size):
            batch_logits, batch_generations = probe_batch(model, encoded[start : start + batch_size], max_new_tokens, stop, pad_id)
            logits += batch_logits
            generations += batch_generations
    return ProbeOutputs(list(prompts), encoded, logits, generations, stop, max_new_tokens)


def check_probes(model: nn.Module, tokenizer, reference: ProbeOutputs, batch_size: int = 8) -> ProbeOutputs:
    """`run_probes(model, ...)` on `reference`'s prompts, its generations found by checking the
    reference's (`verify_batch`, one pass per batch); only rows whose greedy continuation
    differs (or a reference continuation that did not end at a stop token or max_new_tokens)
    are decoded step by step (`probe_batch`), to show what `model` says instead."""
    pad_id = pad_token_id(tokenizer)
    logits: list[Tensor] = []
    generations: list[list[int]] = []
    with _eval_mode(model):
        for start in range(0, len(reference.encoded), batch_size):
            batch = reference.encoded[start : start + batch_size]
            expected = reference.generations[start : start + batch_size]
            batch_logits, same = verify_batch(model, batch, expected, pad_id)
            ended = [len(g) == reference.max_new_tokens or (g and g[-1] in reference.stop_ids) for g in expected]
            differ = [row for row, (ok, end) in enumerate(zip(same, ended)) if not (ok and end)]
            own = dict(zip(differ, probe_batch(model, [batch[row] for row in differ], reference.max_new_tokens,
                                               reference.stop_ids, pad_id)[1])) if differ else {}
            logits += batch_logits
            generations += [own.get(row, g) for row, g in enumerate(expected)]
    return ProbeOutputs(list(reference.prompts), reference.encoded, logits, generations, reference.stop_ids,
                        reference.max_new_tokens)


def fidelity_report(
    reference_model: nn.Module | None,
    candidate_model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 16,
    use_chat_template: bool = True,
    batch_size: int = 8,
    reference: ProbeOutputs | None = None,
) -> FidelityReport:
    """Compare `candidate_model` (the merge) with `reference_model` (quantized base + adapter).

    Both models are run in eval mode and their training mode is restored afterwards; prompts
    run `batch_size` at a time (left-padded, see `probe_batch`). `reference`, the reference
    model's `run_probes` on the same prompts, is used instead of running it again.

    Raises:
        ValueError: no prompts, or a prompt that encodes to no tokens; a `reference` computed on
            other prompts or with another max_new_tokens.
    """
    if reference is None:
        reference = run_probes(reference_model, tokenizer, prompts, max_new_tokens, use_chat_template, batch_size)
    elif reference.prompts != list(prompts) or reference.max_new_tokens != max_new_tokens:
        raise ValueError("fidelity report: the reference probes were run on other prompts or max_new_tokens")
    candidate = check_probes(candidate_model, tokenizer, reference, batch_size)
    rows: list[ProbeRow] = []
    max_diff, kl_sum, agree, positions = 0.0, 0.0, 0, 0
    for index, ids in enumerate(reference.encoded):
        ref, cand = reference.logits[index], candidate.logits[index]  # (T, V) each
        diff = float((ref - cand).abs().max())
        ref_logp = torch.log_softmax(ref.double(), dim=-1)  # (T, V)
        cand_logp = torch.log_softmax(cand.double(), dim=-1)  # (T, V)
        kl = (ref_logp.exp() * (ref_logp - cand_logp)).sum(dim=-1).clamp(min=0.0)  # (T,)
        same = ref.argmax(dim=-1) == cand.argmax(dim=-1)  # (T,)
        max_diff = max(max_diff, diff)
        kl_sum += float(kl.sum())
        agree += int(same.sum())
        positions += len(ids)
        ref_gen, cand_gen = reference.generations[index], candidate.generations[index]
        rows.append(ProbeRow(
            prompt=reference.prompts[index],
            positions=len(ids),
            max_abs_logit_diff=diff,
            greedy_token_agreement=float(same.float().mean()),
            reference_generation=tokenizer.decode(ref_gen, skip_special_tokens=True),
            candidate_generation=tokenizer.decode(cand_gen, skip_special_tokens=True),
            generation_equal=ref_gen == cand_gen,
        ))  # fmt: skip
    return FidelityReport(
        max_abs_logit_diff=max_diff,
        mean_kl=kl_sum / positions,
        greedy_token_agreement=agree / positions,
        generations_equal=all(row.generation_equal for row in rows),
        positions=positions,
        max_new_tokens=max_new_tokens,
        rows=rows,
    )


def check_faithful(report: FidelityReport, min_agreement: float = 0.99) -> None:
    """Raise UnfaithfulMergeError when greedy-token agreement is below `min_agreement`."""
    if report.greedy_token_agreement < min_agreement:
        raise UnfaithfulMergeError(
            f"merge is not faithful: greedy-token agreement {report.greedy_token_agreement:.4f} is below the "
            f"threshold {min_agreement:g}; pass --force to keep it anyway"
        )
