"""train.fast_paths: each speed-up by name, the same numbers with all on and all off, and nothing
left behind when training returns (train/fast_paths.py)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from qlorakit.adapters.inject import add_adapters
from qlorakit.adapters.siblings import SiblingLoraLinear
from qlorakit.config import FAST_PATHS, ConfigError, apply_overrides
from qlorakit.kernels.attention import IMPLEMENTATION
from qlorakit.quant.registry import get_format
from qlorakit.quant.replace import quantize_model
from qlorakit.train.fast_paths import FastPathReport, model_fast_paths, process_fast_paths, resolve_fast_paths
from qlorakit.train.loop import train
from qlorakit.train.loss import causal_lm_loss
from tests.conftest import build_tiny, tiny_llama_config
from tests.train.conftest import tiny_config, write_jsonl

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapted_bf16_model(model=None, dropout: float = 0.1):
    """`model` (default: a tiny Llama in bf16) in NF4 with bf16 compute and LoRA (B non-zero, dropout on):
    every fast path applies to the Llama."""
    model = model if model is not None else build_tiny(tiny_llama_config(), dtype=torch.bfloat16)
    quantize_model(model, get_format("nf4"), torch.bfloat16, progress=False)
    torch.manual_seed(1)
    add_adapters(model, TARGETS, r=4, alpha=8, dropout=dropout)
    for module in model.modules():
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B.weight, std=0.05)
    return model


def _loss_and_adapter_grads(model, batch, seed: int = 3):
    model.train()
    torch.manual_seed(seed)  # the same dropout draws in both models
    loss = causal_lm_loss(model, batch, int((batch["labels"][:, 1:] != -100).sum()))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return float(loss), grads


def test_resolve_and_config_names():
    assert resolve_fast_paths("all") == FAST_PATHS and resolve_fast_paths("none") == ()
    assert resolve_fast_paths(("allocator", "fused_kernels")) == ("fused_kernels", "allocator")  # FAST_PATHS order
    from qlorakit.config import config_from_dict

    cfg = config_from_dict({})
    assert cfg.train.fast_paths == "all"
    assert apply_overrides(cfg, ["train.fast_paths=fused_kernels,allocator"]).train.fast_paths == ("fused_kernels", "allocator")
    with pytest.raises(ConfigError, match=r"^train.fast_paths: unknown fast path 'flash'"):
        apply_overrides(cfg, ["train.fast_paths=flash"])


def test_bf16_step_with_all_paths_on_matches_all_off():
    """Loss and every adapter gradient of a bf16 step: all paths on against all off, three steps'
    worth of batches. The paths reorder bf16 arithmetic (one (Σout, in) matmul instead of three,
    a block-diagonal B, fused RMSNorm/SwiGLU backward), so the results are equal up to bf16
    rounding: loss within 1e-2 relative, gradients within 3e-2 of their largest element (bf16 has
    8 significant bits, 2^-8 = 4e-3 per rounding; a few roundings deep)."""
    plain = _adapted_bf16_model()
    fast = copy.deepcopy(plain)
    report = FastPathReport()
    torch.manual_seed(0)
    batches = []
    for _ in range(3):
        ids = torch.randint(1, 256, (2, 24))
        batches.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)})
    with model_fast_paths(fast, "all", report, dtype="bf16", device="cpu"):
        assert sum(isinstance(m, SiblingLoraLinear) for m in fast.modules()) == 2 * 5  # q,k,v + gate,up per layer
        assert "FusedSwiGLU" in repr(fast) and "sibling 1 of 3" in repr(fast)
        assert fast.config._attn_implementation == IMPLEMENTATION
        for batch in batches:
            loss_plain, grads_plain = _loss_and_adapter_grads(plain, batch)
            loss_fast, grads_fast = _loss_and_adapter_grads(fast, batch)
            assert abs(loss_fast - loss_plain) <= 1e-2 * abs(loss_plain)
            assert grads_fast.keys() == grads_plain.keys()
            for name, expected in grads_plain.items():
                scale = float(expected.abs().max())
                assert float((grads_fast[name] - expected).abs().max()) <= 3e-2 * scale + 1e-8, name
    # undone on exit: transformers' own modules and attention, the same parameters
    assert not any(isinstance(m, SiblingLoraLinear) or type(m).__name__.startswith("Fused") for m in fast.modules())
    assert fast.config._attn_implementation == "sdpa"
    assert list(fast.state_dict()) == list(plain.state_dict())


def test_gemma3_takes_the_paths_that_are_valid_for_it():
    """Gemma 3 (norms scaling by 1 + w, GeGLU, q/k norms, sliding-window layers, scaled embeddings):
    the fused RMSNorm and SwiGLU step aside (0 modules), stacked GQA attention and the sibling
    projections apply, and a bf16 step with all paths equals one with none (tolerances as above)."""
    from tests.gguf_tiny import tiny_config as gguf_tiny_config

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = gguf_tiny_config("gemma3_text", vocab_size=256, hidden_size=64, intermediate_size=128, head_dim=32,
                              query_pre_attn_scalar=32, sliding_window=4)
    plain = _adapted_bf16_model(AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16), dropout=0.0)
    fast = copy.deepcopy(plain)
    ids = torch.randint(1, 256, (2, 12))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    report = FastPathReport()
    with model_fast_paths(fast, "all", report, dtype="bf16", device="cpu"):
        assert not any(type(m).__name__.startswith("Fused") for m in fast.modules())
        assert fast.config._attn_implementation == IMPLEMENTATION
        assert sum(isinstance(m, SiblingLoraLinear) for m in fast.modules()) == 6 * 5  # q,k,v + gate,up, 6 layers
        loss_plain, grads_plain = _loss_and_adapter_grads(plain, batch)
        loss_fast, grads_fast = _loss_and_adapter_grads(fast, batch)
    assert abs(loss_fast - loss_plain) <= 1e-2 * abs(loss_plain)
    for name, expected in grads_plain.items():
        assert float((grads_fast[name] - expected).abs().max()) <= 3e-2 * float(expected.abs().max()) + 1e-8, name


def test_training_runs_match_and_leave_nothing_behind(tiny_model_dir, qa_rows, tmp_path):
    """Three bf16 training steps with all paths and with none: the same per-step losses and
    gradient norms (bf16 tolerance as above) and adapters pointing the same way; after train() returns, the
    model has no swapped module, the attention implementation and registrations are back, and the
    step caches and scratch buffers are empty."""
    from transformers import AttentionInterface

    from qlorakit.adapters import update
    from qlorakit.quant import linear

    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows)
    registered = dict(AttentionInterface._global_mapping)  # other tests may have registered the function already
    results = {}
    for value in ("all", "none"):
        cfg = tiny_config(tiny_model_dir, data, tmp_path / value, max_steps=3, lr=1e-3)
        cfg = apply_overrides(cfg, ["model.dtype=bf16", "adapter.dropout=0.1", f"train.fast_paths={value}"])
        result = train(cfg, progress=False)
        records = [json.loads(line) for line in (tmp_path / value / "metrics.jsonl").read_text().splitlines()]
        losses = [(r["loss"], r["grad_norm"]) for r in records]
        results[value] = (losses, load_file(str(tmp_path / value / "adapter" / "adapter_model.safetensors")))
        model = result.model
        assert not any(isinstance(m, SiblingLoraLinear) or type(m).__name__.startswith("Fused") for m in model.modules())
        assert model.config._attn_implementation == "sdpa"
        assert AttentionInterface._global_mapping == registered
        assert update._shared.drawn is None and update._shared.zeroed is None
        assert "buffers" not in linear._scratch.__dict__
    (losses_all, adapter_all), (losses_none, adapter_none) = results["all"], results["none"]
    assert len(losses_all) == len(losses_none) == 3
    for (loss_a, norm_a), (loss_b, norm_b) in zip(losses_all, losses_none):
        assert abs(loss_a - loss_b) <= 1e-2 * abs(loss_b)
        assert abs(norm_a - norm_b) <= 3e-2 * abs(norm_b)  # the adapter gradients' global norm, per step
    assert adapter_all.keys() == adapter_none.keys()
    for name, expected in adapter_none.items():
        # B starts at zero and Adam moves each element by about lr·sign(g), so an element whose
        # gradient is near zero may step the other way under bf16 rounding (measured: up to 7% of
        # a B's norm in 3 steps); the update's direction must still be the same one.
        cosine = float(torch.nn.functional.cosine_similarity(adapter_all[name].flatten(), expected.flatten(), dim=0))
        assert cosine >= 0.99, (name, cosine)


def test_model_paths_are_undone_when_the_body_raises():
    model = _adapted_bf16_model()
    before = [type(m).__name__ for m in model.modules()]
    report = FastPathReport()
    with pytest.raises(RuntimeError, match="boom"):
        with model_fast_paths(model, "all", report, dtype="bf16", device="cpu"):
            raise RuntimeError("boom")
    assert [type(m).__name__ for m in model.modules()] == before
    assert model.config._attn_implementation == "sdpa"


def test_none_changes_nothing_and_the_report_says_so():
    model = _adapted_bf16_model()
    before = [type(m).__name__ for m in model.modules()]
    with process_fast_paths("none", dtype="bf16") as report:
        with model_fast_paths(model, "none", report, dtype="bf16", device="cpu"):
            assert [type(m).__name__ for m in model.modules()] == before
            assert model.config._attn_implementation == "sdpa"
    assert report.applied == {} and report.off == FAST_PATHS
    assert report.summary() == f"fast paths: none; off: {', '.join(FAST_PATHS)}"
