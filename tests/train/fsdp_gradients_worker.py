"""Run under torchrun with 2 ranks (tests/train/test_fsdp.py): the adapter gradients of a model
sharded by `train.fsdp.shard_model` equal those of its unsharded copy, for every base format.

Each rank feeds the same batch, so the summed (divide factor 1) FSDP gradient is world_size times
the copy's. The dequantizing matmul rebuilds the dense weight in backward from the layer's
parameters: had it seen a shard, the shapes (or the values) would be wrong. Exit code 0 = equal."""

import copy
import os
import sys

import torch

from qlorakit.adapters.inject import add_adapters
from qlorakit.quant.linear import QuantLinear
from qlorakit.quant.registry import format_for_config, get_format
from qlorakit.quant.replace import quantize_model
from qlorakit.train import fsdp
from tests.conftest import build_tiny, tiny_llama_config


def main(method: str) -> None:
    torch.distributed.init_process_group("gloo")
    world = torch.distributed.get_world_size()
    model = build_tiny(tiny_llama_config(hidden_size=256, intermediate_size=512), seed=0)  # K-quant rows: 256 values
    model.requires_grad_(False)
    fmt = format_for_config(method, 32, True) if method in ("nf4", "fp4", "int4") else get_format(method)
    quantize_model(model, fmt, torch.float32, False, False)
    torch.manual_seed(1)
    add_adapters(model, "all-linear", r=4, alpha=8, dropout=0.0, use_rslora=False, kind="lora", group_size=None)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)  # B = 0 would make every gradient of A zero
    reference = copy.deepcopy(model)
    fsdp.shard_model(model, world, "cpu")
    stored = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert stored and all(m.stores_as_parameter and fsdp.is_sharded(m.qweight_storage) for m in stored)
    local = sum(m.qweight_storage.to_local().numel() for m in stored)
    full = sum(m.qweight_storage.numel() for m in stored)
    assert local <= full // world + len(stored) * world, (local, full)  # a rank holds its shards only

    torch.manual_seed(2)
    ids = torch.randint(0, 256, (2, 24))
    for m in (model, reference):
        m.train()
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
    reference_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    checked = 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        grad = fsdp.full_tensor(param.grad)
        torch.testing.assert_close(grad, world * reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)
        checked += 1
    assert checked == len(reference_grads) > 0
    if torch.distributed.get_rank() == 0:
        print(f"equal gradients: {checked} adapter tensors, {method}", file=sys.stderr)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
