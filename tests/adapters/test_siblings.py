"""adapters/siblings.py: q/k/v and gate/up computed as one layer give what each layer's own
forward gives (the per-layer path and plain autograd), draw the same dropout masks, and stay out
of the way wherever they would not be the same computation."""

from __future__ import annotations

import copy

import pytest
import torch

from qlorakit.adapters.inject import add_adapters
from qlorakit.adapters.siblings import group_sibling_projections
from qlorakit.kernels.patch import use_fused_kernels
from qlorakit.quant.registry import get_format
from qlorakit.quant.replace import quantize_model
from tests.conftest import build_tiny, tiny_gpt2_config, tiny_llama_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapted_pair(dtype=torch.bfloat16, dropout=0.1, **config):
    """(per-layer model, grouped model): the same NF4 tiny Llama with LoRA, B non-zero, whose
    activations are in `dtype` (the compute dtype)."""
    model = build_tiny(tiny_llama_config(**config), dtype=dtype)
    quantize_model(model, get_format("nf4"), dtype, progress=False)
    add_adapters(model, TARGETS, r=4, alpha=8, dropout=dropout)
    for module in model.modules():
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B.weight, std=0.1)
    use_fused_kernels(model)
    grouped = copy.deepcopy(model)
    return model, grouped, group_sibling_projections(grouped)


def _graph_node_names(tensor) -> set[str]:
    """Names of every autograd node that `tensor` depends on."""
    names, seen, stack = set(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def _loss_and_grads(model, ids, seed):
    torch.manual_seed(seed)  # the dropout masks come from torch's generator
    loss = model(input_ids=ids, labels=ids).loss
    nodes = _graph_node_names(loss)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, nodes


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_grouped_training_step_matches_per_layer(dropout):
    model, grouped, groups = _adapted_pair(dropout=dropout)
    assert groups == 2 * model.config.num_hidden_layers  # one attention and one MLP group per layer
    model.train(), grouped.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    loss_ref, grads_ref, nodes_ref = _loss_and_grads(model, ids, seed=3)
    loss, grads, nodes = _loss_and_grads(grouped, ids, seed=3)
    assert "_SiblingProjectionsBackward" in nodes and "_SiblingProjectionsBackward" not in nodes_ref
    torch.testing.assert_close(loss, loss_ref, rtol=1e-2, atol=1e-2)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        ref = grads_ref[name]
        # bf16 activations summed in another order: compare against the gradient's own scale
        assert (grad - ref).abs().max() <= 2e-2 * ref.abs().max() + 1e-6, name


def test_grouped_layers_equal_plain_autograd_on_one_attention():
    """Against an independent reference: the three outputs and every gradient of one q/k/v group
    equal x Wᵀ + s · B A dropout(x) written in plain autograd, under the group's own mask."""
    model, grouped, _ = _adapted_pair(dropout=0.2)
    attention = grouped.model.layers[0].self_attn
    members = [attention.q_proj, attention.k_proj, attention.v_proj]
    for m in members:
        m.train()
    x = torch.randn(2, 5, model.config.hidden_size).bfloat16().requires_grad_()
    torch.manual_seed(7)
    outputs = [m(x) for m in members]
    grads_out = [torch.randn_like(y) for y in outputs]
    torch.autograd.backward(outputs, grads_out)
    got = [x.grad] + [p.grad for m in members for p in (m.lora_A.weight, m.lora_B.weight)]

    from qlorakit.adapters.update import shared_dropout_positions

    drawn = shared_dropout_positions(x, 0.2)  # the positions the group drew for x (a new draw would not match below)
    keep = torch.ones(x.numel(), dtype=torch.bool)
    keep[drawn] = False
    keep = keep.view(x.shape)
    x_ref = x.detach().float().requires_grad_()
    weights = [(p.detach().clone().requires_grad_()) for m in members for p in (m.lora_A.weight, m.lora_B.weight)]
    dropped = x_ref * keep / (1 - 0.2)
    total = 0
    for i, m in enumerate(members):
        a, b = weights[2 * i], weights[2 * i + 1]
        dense = m.base_layer.dequantize_weight(torch.float32)
        y = x_ref @ dense.t() + m.scaling * (dropped @ a.t()) @ b.t()
        torch.testing.assert_close(outputs[i].float(), y, rtol=2e-2, atol=2e-2)
        total = total + (y * grads_out[i].float()).sum()
    expected = torch.autograd.grad(total, [x_ref] + weights)
    for g, e in zip(got, expected):
        assert (g.float() - e).abs().max() <= 2e-2 * e.abs().max(), (g.shape, (g.float() - e).abs().max())


def test_members_called_in_any_order_or_on_other_inputs():
    """Each member returns its own output whichever is called first; a different tensor (or the
    same one modified in place) is computed afresh, never served from another input's results."""
    _, grouped, _ = _adapted_pair(dropout=0.0)
    attention = grouped.model.layers[0].self_attn
    q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
    x = torch.randn(2, 5, grouped.config.hidden_size).bfloat16().requires_grad_()
    with torch.no_grad():
        expected = [m.base_layer(x) + m.update(x).bfloat16() for m in (q, k, v)]
    got_v, got_q, got_k = v(x), q(x), k(x)
    for g, e in zip((got_q, got_k, got_v), expected):
        torch.testing.assert_close(g, e, rtol=2e-2, atol=2e-2)
    other = torch.randn_like(x).requires_grad_()
    q(x)
    torch.testing.assert_close(k(other), k.base_layer(other) + k.update(other).bfloat16(), rtol=2e-2, atol=2e-2)
    y = x.detach().clone().requires_grad_()
    q(y)
    with torch.no_grad():
        y.mul_(2)
    torch.testing.assert_close(k(y), k.base_layer(y) + k.update(y).bfloat16(), rtol=2e-2, atol=2e-2)


def _node(y):
    return type(y.grad_fn).__name__


def test_group_steps_aside_where_it_would_not_be_the_same_computation():
    _, grouped, _ = _adapted_pair()
    attention = grouped.model.layers[0].self_attn
    x = torch.randn(1, 3, grouped.config.hidden_size).bfloat16().requires_grad_()
    assert _node(attention.q_proj(x)) == "_SiblingProjectionsBackward"
    with torch.no_grad():
        assert attention.q_proj(x).grad_fn is None  # inference: each layer's own forward
    attention.k_proj.disabled = True
    assert _node(attention.q_proj(x)) != "_SiblingProjectionsBackward"
    attention.k_proj.disabled = False
    attention.k_proj.train(not attention.q_proj.training)  # members in different modes
    assert _node(attention.q_proj(x)) != "_SiblingProjectionsBackward"

    _, grouped_fp32, _ = _adapted_pair(dtype=torch.float32)  # fp32 compute keeps the per-layer fp32 path
    attention = grouped_fp32.model.layers[0].self_attn
    x = torch.randn(1, 3, grouped_fp32.config.hidden_size).requires_grad_()
    assert _node(attention.q_proj(x)) != "_SiblingProjectionsBackward"


def test_only_the_llama_family_is_grouped():
    model = build_tiny(tiny_gpt2_config())
    add_adapters(model, ["c_attn", "c_proj", "c_fc"], r=4, alpha=8)
    assert group_sibling_projections(model) == 0
