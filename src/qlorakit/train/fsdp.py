"""Fully sharded data parallel training (`train.distributed: fsdp`) on torch's FSDP2.

    every QuantLinear       -> store_as_parameter(): its codes and statistics become one frozen
                               uint8 parameter, which FSDP shards (it replicates buffers)
    every decoder layer     -> fully_shard(layer): one FSDP unit, gathered for its forward and
                               again for its backward, resharded after each
    the model               -> fully_shard(model): the root unit, for trainable parameters outside
                               the layers (an adapter on the head); the frozen ones (embeddings,
                               final norm, head) stay whole on every rank: the root unit is gathered
                               for the whole step, so sharding them would add a gathered copy to
                               each rank's shard, costing memory instead of saving it
    gradients               -> reduce-scattered and *summed* (divide factor 1): the loss is already
                               Σ token losses / tokens of the global step, as under DDP

so a rank holds 1/N of the 4-bit base, of the adapter, of its gradients and of the optimizer
state, plus the decoder layers gathered at a time (the one computing, the one prefetched). A
QuantLinear's dequantize-in-backward reads the layer's parameters when its backward runs, which
is inside its decoder layer's backward, after FSDP's pre-backward hook has gathered them
(tests/train/test_fsdp.py checks the gradients).

Checkpoints and the peft adapter hold full tensors: every rank takes part in gathering them
(`full_adapter_state`, `full_optimizer_state`) and rank 0 writes; a resume gives each rank its
shards of them again. Device-agnostic: the mesh is on the model's device type (gloo on the CPU,
NCCL on CUDA).
"""

from __future__ import annotations

import torch
from torch import nn

from qlorakit.adapters.peft_format import adapter_state_dict
from qlorakit.quant.linear import QuantLinear


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules transformers itself keeps whole across devices (`_no_split_modules`: the decoder
    layer class, e.g. LlamaDecoderLayer, GPT2Block), in model order."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    if not layers:
        raise ValueError(f"train.distributed: fsdp: {type(model).__name__} names no decoder layer class "
                         f"(_no_split_modules), so there is no unit to shard by")
    return layers


def shard_model(model: nn.Module, world_size: int, device: str | torch.device) -> int:
    """Shard `model` in place across the `world_size` ranks of the default process group (module
    docstring); returns the number of FSDP units (decoder layers + the root)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(model)  # first: a model without decoder layers is refused unchanged
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.store_as_parameter()
    mesh = init_device_mesh(torch.device(device).type, (world_size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    replicated = {p for p in model.parameters() if id(p) not in in_layers and not p.requires_grad}
    for param in replicated:
        param.data = param.data.to(mesh.device_type)  # FSDP moves only the parameters it manages
    fully_shard(model, mesh=mesh, ignored_params=replicated)
    for unit in (*layers, model):  # per unit: neither setting recurses
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM
    return len(layers) + 1


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor shard (a collective: every rank calls it), else `tensor`."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def full_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """`adapter_state_dict` with every shard gathered (every rank calls it, in the same order)."""
    return {name: full_tensor(tensor).cpu().contiguous() for name, tensor in adapter_state_dict(model).items()}


def load_full_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy peft-named full tensors into the model's (sharded) adapter parameters."""
    from torch.distributed.tensor import distribute_tensor

    named = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in state.items():
            param = named.get(key.removeprefix("base_model.model."))
            if param is None:
                continue  # VeRA's shared projection is a buffer, drawn again from its key
            if is_sharded(param):
                tensor = distribute_tensor(tensor.to(param.dtype), param.device_mesh, param.placements)
            param.copy_(tensor)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state with full tensors, keyed by parameter name (every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Give each rank its shards of a state `full_optimizer_state` wrote."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def sharded_gradient_norm(params: list[torch.Tensor], max_norm: float | None) -> float:
    """The global L2 norm of the (sharded) gradients, same on every rank; with `max_norm`, the
    gradients are scaled by min(1, max_norm / (norm + 1e-6)) as torch's clip_grad_norm_ does."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = full_tensor(torch.nn.utils.get_total_norm(grads))
    norm = float(total)
    if max_norm is not None:
        scale = min(1.0, max_norm / (norm + 1e-6))
        if scale < 1.0:
            for grad in grads:
                grad.mul_(scale)
    return norm
