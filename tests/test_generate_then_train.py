"""bitsandbytes 0.50.2's Linear4bit repacks its weight on the first no-grad CPU forward, after
which gradients are wrong. qlorakit's layers must give the same gradients in any call order."""

import copy

import pytest
import torch

from qlorakit.adapters.inject import add_adapters, adapter_layers
from qlorakit.models.load import load_model


def _lora_grads(model, ids):
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow
@pytest.mark.smollm2
def test_generate_then_backward_gives_fresh_gradients():
    loaded = load_model("smollm2", dtype="bf16", quant="nf4", progress=False)
    add_adapters(loaded.model, "all-linear", r=16, alpha=32)
    torch.manual_seed(0)
    for layer in adapter_layers(loaded.model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.01)
    fresh = copy.deepcopy(loaded.model)
    ids = loaded.tokenizer("What day was I born? January 1, 2058", return_tensors="pt").input_ids

    with torch.no_grad():
        loaded.model.generate(ids, max_new_tokens=4, do_sample=False)
    after_generate = _lora_grads(loaded.model, ids)
    reference = _lora_grads(fresh, ids)
    assert after_generate.keys() == reference.keys() and len(reference) == 2 * 210
    for name, grad in reference.items():
        assert torch.equal(after_generate[name], grad), name
        assert grad.abs().sum() > 0


@pytest.mark.slow
@pytest.mark.smollm2
def test_nf4_smollm2_is_bitsandbytes_nf4_of_the_gguf_weights():
    """qlorakit's nf4 SmolLM2 against an independent reference: the dense model read from the GGUF
    with every quantized layer's weight put through bitsandbytes' quantize_4bit -> dequantize_4bit
    (nf4, blocks of 64, fp32 absmax: without double quantization, whose nested codes bitsandbytes'
    CPU kernel rounds differently on a few near-ties, tests/models/test_load.py). The weights are
    then identical, so the logits may differ only by the order of fp32 summation in the matmuls:
    allow 1e-4 (the logits here reach 30; measured: 0, bit-identical), where nf4's rounding itself
    moves them by up to about 15 from the dense model's."""
    from bitsandbytes import functional as bnb_functional

    from qlorakit.quant.linear import QuantLinear

    reference = load_model("smollm2", dtype="fp32", quant="none", progress=False).model
    nf4 = load_model("smollm2", dtype="fp32", quant="nf4", double_quant=False, progress=False).model
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30]])
    with torch.no_grad():
        dense_logits = reference(ids).logits
    layers = dict(reference.named_modules())
    quantized = [(name, m) for name, m in nf4.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 7 * 30  # every projection of the 30 decoder layers; the tied head stays dense
    with torch.no_grad():
        for name, layer in quantized:
            weight = layers[name].weight
            packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type="nf4")
            weight.copy_(bnb_functional.dequantize_4bit(packed, state))
            assert torch.equal(layer.dequantize_weight(torch.float32), weight), name
        expected, got = reference(ids).logits, nf4(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert (dense_logits - expected).abs().max() > 1.0  # the reference is quantized, not the dense model
