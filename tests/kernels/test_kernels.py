"""kernels/: the fused RMSNorm and SwiGLU equal transformers' modules, forward bit for bit,
backward to float rounding, alone and inside a whole model with adapters."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from qlorakit.adapters.inject import add_adapters
from qlorakit.kernels.patch import use_fused_kernels
from qlorakit.kernels.rmsnorm import FusedRMSNorm
from qlorakit.kernels.swiglu import FusedSwiGLU
from tests.conftest import build_tiny, tiny_gpt2_config, tiny_llama_config

DTYPES = [torch.float32, torch.bfloat16]


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_matches_llama(dtype):
    torch.manual_seed(0)
    reference = LlamaRMSNorm(48, eps=1e-5).to(dtype)
    torch.nn.init.normal_(reference.weight, 1.0, 0.2)
    fused = FusedRMSNorm(copy.deepcopy(reference.weight), reference.variance_epsilon)
    x = (torch.randn(3, 7, 48) * 3).to(dtype).requires_grad_()
    grad = torch.randn(3, 7, 48).to(dtype)
    y_ref, y = reference(x), fused(x)
    assert torch.equal(y, y_ref)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, reference.weight), grad)
    gx, gw = torch.autograd.grad(y, (x, fused.weight), grad)
    torch.testing.assert_close(gx, gx_ref, **_tol(dtype))
    torch.testing.assert_close(gw, gw_ref, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_llama_mlp(dtype):
    torch.manual_seed(0)
    reference = LlamaMLP(tiny_llama_config()).to(dtype)
    fused = FusedSwiGLU(reference.gate_proj, reference.up_proj, reference.down_proj)
    x = torch.randn(2, 5, reference.hidden_size).to(dtype).requires_grad_()
    grad = torch.randn(2, 5, reference.hidden_size).to(dtype)
    y_ref, y = reference(x), fused(x)
    assert torch.equal(y, y_ref)
    params = [x, reference.gate_proj.weight, reference.up_proj.weight]
    expected = torch.autograd.grad(y_ref, params, grad)
    got = torch.autograd.grad(y, params, grad)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **_tol(dtype))


def test_whole_model_with_adapters_is_unchanged():
    torch.manual_seed(0)
    model = build_tiny(tiny_llama_config())
    for p in model.parameters():
        p.requires_grad_(False)
    add_adapters(model, "all-linear", r=4, alpha=8)
    for module in model.modules():
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B.weight, std=0.1)
    fused = copy.deepcopy(model)
    originals = use_fused_kernels(fused)
    layers = model.config.num_hidden_layers
    kinds = [type(m).__name__ for m in originals.values()]
    assert kinds.count("LlamaRMSNorm") == 2 * layers + 1 and kinds.count("LlamaMLP") == layers
    assert all(type(fused.get_submodule(name)).__name__.startswith("Fused") for name in originals)
    assert list(fused.state_dict()) == list(model.state_dict())
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    model.eval(), fused.eval()
    out_ref, out = model(input_ids=ids, labels=ids), fused(input_ids=ids, labels=ids)
    assert torch.equal(out.logits, out_ref.logits)
    out_ref.loss.backward(), out.loss.backward()
    reference = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for name, p in fused.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, reference[name], rtol=1e-4, atol=1e-6, msg=name)


def test_other_architectures_are_left_alone():
    model = build_tiny(tiny_gpt2_config())
    assert use_fused_kernels(model) == {}
