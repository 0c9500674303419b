"""computing_in: a bf16 adapter model computing in fp32 matches its fp32 merge, and is restored after."""

import pytest
import torch
from torch import nn

from qlorakit.adapters.inject import add_adapters, adapter_layers
from qlorakit.merge.fold import merge_to_dense
from qlorakit.models.precision import computing_in
from qlorakit.quant.linear import QuantLinear
from qlorakit.quant.registry import get_format
from qlorakit.quant.replace import quantize_model
from tests.conftest import build_tiny
from tests.merge.conftest import CONFIGS, logits


def bf16_adapter_model(arch: str):
    """A tiny model read in bf16, nf4 base computing in bf16, fp32 adapters with random B."""
    model = build_tiny(CONFIGS[arch](), dtype=torch.bfloat16)
    quantize_model(model, get_format("nf4"), torch.bfloat16, progress=False)
    add_adapters(model, "all-linear", r=4, alpha=8)
    torch.manual_seed(1)
    for layer in adapter_layers(model).values():
        nn.init.normal_(layer.lora_B.weight, std=0.05)
    return model.eval()


@pytest.mark.parametrize("arch", ["llama", "llama-tied"])
def test_fp32_computation_of_a_bf16_model_is_its_fp32_merge(arch, random_ids):
    model = bf16_adapter_model(arch)
    merged = merge_to_dense(model, torch.float32)
    in_bf16 = logits(model, random_ids)
    with computing_in(model, torch.float32):
        in_fp32 = logits(model, random_ids)
    expected = logits(merged, random_ids)
    torch.testing.assert_close(in_fp32, expected, rtol=0, atol=1e-4)
    assert (in_bf16 - expected).abs().max() > 100 * (in_fp32 - expected).abs().max()  # bf16 arithmetic is far off


def test_everything_is_put_back(random_ids):
    model = bf16_adapter_model("llama")
    before = {name: t.clone() for name, t in model.state_dict().items()}
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    first = logits(model, random_ids)
    with computing_in(model, torch.float32):
        assert {p.dtype for name, p in model.named_parameters()} == {torch.float32}
    assert {name: p.dtype for name, p in model.named_parameters()} == dtypes
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())
    assert all(m.compute_dtype == torch.bfloat16 for m in model.modules() if isinstance(m, QuantLinear))
    assert torch.equal(logits(model, random_ids), first)


def test_a_down_cast_loses_nothing_on_exit():
    model = build_tiny(CONFIGS["llama"]())  # fp32, unquantized
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with computing_in(model, torch.bfloat16):
        assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())
