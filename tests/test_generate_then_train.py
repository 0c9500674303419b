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


@pytest.mark.smollm2
def test_nf4_smollm2_stays_close_to_the_gguf_weights():
    dense = load_model("smollm2", dtype="fp32", quant="none", progress=False).model
    nf4 = load_model("smollm2", dtype="fp32", quant="nf4", progress=False).model
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30]])
    with torch.no_grad():
        a, b = dense(ids).logits, nf4(ids).logits
    # NF4 re-quantization of a Q4_1 model: next-token predictions mostly survive.
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.7
