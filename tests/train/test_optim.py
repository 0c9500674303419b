"""train/optim.py: the optimizer over adapter parameters."""

from __future__ import annotations

import pytest
import torch

from qlorakit.adapters.inject import add_adapters
from qlorakit.train.optim import build_optimizer
from tests.conftest import build_tiny, tiny_llama_config


def test_adamw_updates_equal_torch_single_tensor_adamw():
    """The fused AdamW qlorakit builds takes the steps of torch's reference (for-loop) AdamW with
    the same hyperparameters, on the adapter parameters only."""
    model = build_tiny(tiny_llama_config())
    add_adapters(model, ["q_proj", "v_proj"], r=4, alpha=8)
    optimizer = build_optimizer(model, "adamw", lr=1e-2, weight_decay=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    assert [p for group in optimizer.param_groups for p in group["params"]] == params
    copies = [p.detach().clone().requires_grad_() for p in params]
    reference = torch.optim.AdamW(copies, lr=1e-2, weight_decay=0.1, foreach=False)
    torch.manual_seed(0)
    for _ in range(4):
        for p, c in zip(params, copies):
            c.grad = torch.randn_like(p)
            p.grad = c.grad.clone()
        optimizer.step()
        reference.step()
    for p, c in zip(params, copies):
        torch.testing.assert_close(p, c, rtol=1e-6, atol=1e-7)


def test_unknown_optimizer_and_no_adapters_are_refused():
    model = build_tiny(tiny_llama_config())
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, "adamw", 1e-3, 0.0)
    add_adapters(model, ["q_proj"], r=2, alpha=4)
    with pytest.raises(ValueError, match="train.optimizer"):
        build_optimizer(model, "sgd", 1e-3, 0.0)
