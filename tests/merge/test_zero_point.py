"""QA-LoRA exact fold into per-group mins (merge/zero_point.py), on synthetic layers and tiny models.

The fold must leave d/scales and codes byte for byte, change only the mins, and reproduce
W₀ + ΔW up to the fp16 rounding of each new min. The real SmolLM2 GGUF is folded and written in
tests/export/test_gguf.py (one model load for both).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlorakit.adapters.lora import LoraLinear
from qlorakit.adapters.qalora import QALoraLinear
from qlorakit.merge.fold import MergeError
from qlorakit.merge.zero_point import fold_qalora_into_base, merged_qalora_model
from qlorakit.quant.linear import QuantLinear
from qlorakit.quant.registry import get_format
from tests.conftest import tiny_llama_config
from tests.merge.conftest import adapter_model, logits

# base format, its group size, QA-LoRA pooling group, format of the folded weight
CASES = [
    ("int4", 32, 32, "int4"),
    ("int4", 32, 128, "int4"),
    ("int4", 64, 64, "int4"),
    ("q4_1", 32, 64, "q4_1"),
    ("q5_1", 32, 32, "q5_1"),
    ("q4_0", 32, 32, "q4_1"),  # lossless conversion to the affine format first
    ("q5_0", 32, 64, "q5_1"),
]
GGUF_BYTES = {"q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24}
# byte ranges of (d, codes) in each block; the affine formats hold m at bytes 2..3
D_AND_CODES = {"q4_0": (slice(0, 2), slice(2, 18)), "q5_0": (slice(0, 2), slice(2, 22)),
               "q4_1": (slice(0, 2), slice(4, 20)), "q5_1": (slice(0, 2), slice(4, 24))}


def qalora_layer(fmt: str, base_group: int, pool: int, seed: int = 0, in_features: int = 256, out_features: int = 24):
    """A QA-LoRA layer over a quantized random nn.Linear, with random A and B."""
    torch.manual_seed(seed)
    dense = nn.Linear(in_features, out_features, bias=True)
    base = QuantLinear.from_dense(dense, get_format(fmt, group_size=base_group), torch.float32)
    layer = QALoraLinear(base, r=4, alpha=8, group_size=pool)
    nn.init.normal_(layer.lora_B.weight, std=0.05)
    return layer


def fp16_min_bound(new_min: torch.Tensor) -> torch.Tensor:
    """Half an fp16 ulp of each stored min, plus fp32 slack: |fp16(x) - x| <= 2^-11 |x| (normal range)."""
    return new_min.abs() * 2.0**-11 + 2.0**-24 + 1e-6


def unchanged_parts(q, fmt: str):
    """(d or scales, codes) bytes of a weight, to compare before and after a fold."""
    if q.format == "int4":
        return q.tensors["scales"].view(torch.uint8), q.tensors["codes"]
    blocks = q.tensors["blocks"].view(q.out_features, -1, GGUF_BYTES[q.format])  # (out, nblocks, bytes)
    d, codes = D_AND_CODES[q.format]
    return blocks[..., d], blocks[..., codes]


def stored_mins(q) -> torch.Tensor:
    """The per-group mins as fp32 (out, in / group_size)."""
    if q.format == "int4":
        return q.tensors["mins"].float()
    blocks = q.tensors["blocks"].view(q.out_features, -1, GGUF_BYTES[q.format])  # (out, nblocks, bytes)
    return blocks[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1)  # (out, nblocks)


@pytest.mark.parametrize("fmt,base_group,pool,folded_fmt", CASES)
def test_fold_changes_only_the_mins(fmt, base_group, pool, folded_fmt):
    layer = qalora_layer(fmt, base_group, pool)
    before = layer.base_layer.qweight
    folded = fold_qalora_into_base(nn.ModuleDict({"proj": layer}))["proj"]
    assert folded.format == folded_fmt and folded.shape == before.shape
    for old, new in zip(unchanged_parts(before, fmt), unchanged_parts(folded, folded_fmt)):
        assert torch.equal(old, new)  # d (scales) and codes byte for byte
    mins_after = stored_mins(folded)  # (out, in / g)
    if fmt in ("q4_0", "q5_0"):
        assert (mins_after != 0).float().mean() > 0.9
    else:
        assert (mins_after != stored_mins(before)).float().mean() > 0.9
    expected = layer.base_layer.dequantize_weight(torch.float32) + layer.delta_weight()  # (out, in)
    got = get_format(folded.format, group_size=folded.group_size).dequantize(folded)  # (out, in)
    bound = fp16_min_bound(mins_after).repeat_interleave(folded.group_size, dim=1)  # (out, in)
    assert ((got - expected).abs() <= bound).all()
    assert (got - expected).abs().max() < 0.05 * layer.delta_weight().abs().max()


def test_fold_leaves_the_model_unchanged():
    layer = qalora_layer("q4_0", 32, 32)
    blocks = layer.base_layer.qweight.tensors["blocks"].clone()
    fold_qalora_into_base(nn.ModuleDict({"proj": layer}))
    assert layer.base_layer.fmt.name == "q4_0" and torch.equal(layer.base_layer.qweight.tensors["blocks"], blocks)


@pytest.mark.parametrize("fmt", ["q8_0", "nf4"])
def test_base_without_mins_is_refused_naming_the_layer(fmt):
    torch.manual_seed(0)
    base = QuantLinear.from_dense(nn.Linear(128, 16), get_format(fmt), torch.float32)
    model = nn.ModuleDict({"proj": QALoraLinear(base, r=4, alpha=8, group_size=64)})
    with pytest.raises(MergeError, match=rf"proj: base format {fmt} stores no per-group min.*16-bit merge"):
        fold_qalora_into_base(model)


def test_plain_lora_is_refused():
    base = QuantLinear.from_dense(nn.Linear(128, 16), get_format("q4_1"), torch.float32)
    model = nn.ModuleDict({"proj": LoraLinear(base, r=4, alpha=8)})
    with pytest.raises(MergeError, match=r"proj: plain LoRA layer.*16-bit merge"):
        fold_qalora_into_base(model)


def test_unquantized_base_and_disabled_adapter_are_refused():
    model = nn.ModuleDict({"proj": QALoraLinear(nn.Linear(128, 16), r=4, alpha=8, group_size=32)})
    with pytest.raises(MergeError, match=r"proj: the base layer is not quantized"):
        fold_qalora_into_base(model)
    layer = qalora_layer("int4", 32, 32)
    layer.disabled = True
    with pytest.raises(MergeError, match=r"proj: the adapter is disabled"):
        fold_qalora_into_base(nn.ModuleDict({"proj": layer}))
    with pytest.raises(MergeError, match=r"no adapter layers"):
        fold_qalora_into_base(nn.Linear(4, 4))


def test_pooling_group_must_cover_whole_base_groups():
    layer = qalora_layer("int4", 64, 32)  # 32-wide pooling inside 64-wide int4 groups: not constant per group
    with pytest.raises(MergeError, match=r"proj: QA-LoRA group size 32 is not a multiple of the base group size 64"):
        fold_qalora_into_base(nn.ModuleDict({"proj": layer}))


def base_logits(model, ids):
    """Logits of the adapter model with every adapter disabled (its quantized base)."""
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    for layer in layers:
        layer.disabled = True
    try:
        return logits(model, ids)
    finally:
        for layer in layers:
            layer.disabled = False


@pytest.mark.parametrize("fmt,pool", [("int4", 64), ("q4_0", 32), ("q4_1", 64)])
def test_merged_model_matches_the_adapter_model(fmt, pool, random_ids):
    model = adapter_model(tiny_llama_config(), fmt=fmt, kind="qalora", group_size=pool)
    reference = logits(model, random_ids)
    base = base_logits(model, random_ids)
    merged = merged_qalora_model(model)
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert merged.model.embed_tokens.weight is model.model.embed_tokens.weight  # frozen tensors shared
    diff = (logits(merged, random_ids) - reference).abs().max()
    effect = (base - reference).abs().max()
    assert effect > 0.05  # the adapters do change the output ...
    assert diff < 2e-3 * reference.abs().max() and diff < 0.02 * effect  # ... and the fold keeps that change
    assert torch.equal(logits(model, random_ids), reference)  # the adapter model is unchanged
