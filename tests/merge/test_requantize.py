"""peft-style re-quantizing merge, and the kept/noise figures that say what it costs."""

import math

import pytest
import torch
from torch import nn

from qlorakit.adapters.inject import adapter_layers
from qlorakit.adapters.lora import LoraLinear
from qlorakit.merge.fold import fold_layer, merge_to_dense
from qlorakit.merge.requantize import requantize_like_peft
from qlorakit.merge.survival import UpdateSurvival, layer_survival, update_survival, update_survivals
from qlorakit.quant.linear import QuantLinear
from qlorakit.quant.nf4 import NF4_LEVELS
from qlorakit.quant.registry import get_format
from tests.merge.conftest import CONFIGS, adapter_model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_requantized_weights_are_nf4_of_dequantized_plus_delta(arch):
    model = adapter_model(CONFIGS[arch]())
    merged = merge_to_dense(model, torch.float32)
    requantized = requantize_like_peft(merged, "nf4", torch.float32)
    fmt = get_format("nf4")
    for name, layer in adapter_layers(model).items():
        folded, _, _ = fold_layer(layer)  # dequantize(W_q) + ΔW, (out, in)
        expected = fmt.quantize(folded)
        got = requantized.get_submodule(name)
        assert isinstance(got, QuantLinear)
        assert got.source_layout == ("conv1d" if arch == "gpt2" else "linear")
        for key, tensor in expected.tensors.items():
            assert torch.equal(got.qweight.tensors[key], tensor), (name, key)
    assert not isinstance(requantized.get_output_embeddings(), QuantLinear)  # the head is left alone
    assert not any(isinstance(m, QuantLinear) for m in merged.modules())  # input unchanged


def test_survival_formulas_on_a_hand_made_example():
    """W₀ = 0, ΔW = 0.5 everywhere, W_m = 0.25 everywhere: half kept, error half the update."""
    stats = layer_survival(torch.zeros(2, 4), torch.full((2, 4), 0.5), torch.full((2, 4), 0.25))
    assert stats.kept == pytest.approx(0.5) and stats.noise == pytest.approx(0.5)
    assert stats.delta_sq == pytest.approx(8 * 0.25) and stats.error_sq == pytest.approx(8 * 0.0625)
    assert math.isnan(layer_survival(torch.zeros(2), torch.zeros(2), torch.ones(2)).kept)


@pytest.mark.parametrize("shape", [(96, 160), (1536, 576)])
def test_survival_sums_match_an_fp64_reference(shape):
    """fp32 differences and torch's cascaded fp32 sums give the all-fp64 figures (a bf16 merge of a
    small update), up to SmolLM2's largest projection."""
    torch.manual_seed(0)
    w_base = torch.randn(*shape)
    delta = torch.randn(*shape) * 1e-3
    w_merged = (w_base + delta).to(torch.bfloat16)
    stats = layer_survival(w_base, delta, w_merged)
    b, d, m = w_base.double(), delta.double(), w_merged.double()
    assert stats.dot == pytest.approx(float(((m - b) * d).sum()), rel=1e-6)
    assert stats.delta_sq == pytest.approx(float((d * d).sum()), rel=1e-6)
    assert stats.error_sq == pytest.approx(float(((m - b - d) ** 2).sum()), rel=1e-6)


class _OneLayer(nn.Module):
    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj


def _nf4_case(step: float) -> tuple[nn.Module, nn.Module]:
    """A 1x64 nf4 weight that lies on the nf4 grid (absmax 1, others 0), plus an update of `step`
    at column 1 (r = 1, s = 1: ΔW = B A exactly), and peft's re-quantization of W₀ + ΔW."""
    fmt = get_format("nf4", double_quant=False)
    weight = torch.zeros(1, 64)
    weight[0, 0] = 1.0
    base = QuantLinear(fmt.quantize(weight), fmt, compute_dtype=torch.float32)
    assert torch.equal(base.dequantize_weight(torch.float32), weight)  # W₀ is exact
    lora = LoraLinear(base, r=1, alpha=1)
    with torch.no_grad():
        lora.lora_A.weight.zero_()
        lora.lora_A.weight[0, 1] = 1.0
        lora.lora_B.weight.fill_(step)
    requantized = QuantLinear(fmt.quantize(fold_layer(lora)[0]), fmt, compute_dtype=torch.float32)
    return _OneLayer(lora), _OneLayer(requantized)


def test_an_update_of_one_nf4_step_survives_and_half_a_step_rounds_away():
    one_step = NF4_LEVELS[8]  # the level just above 0.0
    kept_model, kept_rq = _nf4_case(one_step)
    kept = update_survival(kept_model, kept_rq)
    assert kept.kept == pytest.approx(1.0) and kept.noise == pytest.approx(0.0, abs=1e-7)
    lost_model, lost_rq = _nf4_case(0.4 * one_step)  # below the midpoint: rounds back to 0
    lost = update_survival(lost_model, lost_rq)
    assert lost.kept == pytest.approx(0.0) and lost.noise == pytest.approx(1.0)
    # Over both layers, each counts by its update's size: Σ dot / Σ |ΔW|², sqrt(Σ err² / Σ |ΔW|²).
    both = UpdateSurvival({"a": kept.layers["proj"], "b": lost.layers["proj"]})
    a, b = one_step**2, (0.4 * one_step) ** 2
    assert both.kept == pytest.approx(a / (a + b)) and both.noise == pytest.approx(math.sqrt(b / (a + b)))
    assert set(both.to_dict()) == {"kept", "noise", "layers"}


def test_fold_keeps_the_update_and_requantizing_loses_part_of_it():
    model = adapter_model(CONFIGS["llama"]())
    with torch.no_grad():  # a trained update is small next to W; at this size peft's merge loses about 40%
        for layer in adapter_layers(model).values():
            layer.lora_B.weight.mul_(0.1)
    exact = update_survival(model, merge_to_dense(model, torch.float32))
    assert exact.kept == pytest.approx(1.0, abs=1e-5) and exact.noise < 1e-4
    bf16 = update_survival(model, merge_to_dense(model, torch.bfloat16))
    assert bf16.kept == pytest.approx(1.0, abs=0.01) and bf16.noise < 0.1
    requantized = update_survival(model, requantize_like_peft(merge_to_dense(model, torch.float32), "nf4", torch.float32))
    assert requantized.kept < 0.8 and requantized.noise > 0.5
    assert set(requantized.layers) == set(adapter_layers(model))


def test_one_pass_over_several_merged_models_equals_one_call_each():
    model = adapter_model(CONFIGS["llama"]())
    dense = merge_to_dense(model, torch.float32)
    requantized = requantize_like_peft(dense, "nf4", torch.float32)
    together = update_survivals(model, [dense, requantized])
    for one, merged in zip(together, [dense, requantized]):
        alone = update_survival(model, merged)
        assert one.to_dict() == alone.to_dict()
    assert together[0].kept != together[1].kept
