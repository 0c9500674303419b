"""Data-parallel training on torch.distributed, launched by torchrun (or any launcher that sets
WORLD_SIZE / RANK / LOCAL_RANK / MASTER_ADDR / MASTER_PORT).

Each rank takes its own slice of every global batch (batch_size rows per rank, batch_size ·
world_size rows in all) and computes Σ token losses / (trained tokens of the global step), so
summing the ranks' gradients gives exactly the gradient of one process running the global batch:

    g = Σ_r ∇ (Σ_{t ∈ rank r} ℓ_t) / N_global

Only adapter gradients are reduced (the 4-bit base is frozen and identical on every rank); only
rank 0 writes checkpoints, logs, metrics and the progress bar. gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """All-reduce (sum) the gradients of `params` across ranks, in one flat buffer."""
        if self.size == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])  # (Σ numel,)
        torch.distributed.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def sum_int(self, value: int, device) -> int:
        if self.size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.long, device=device)
        torch.distributed.all_reduce(tensor)
        return int(tensor.item())

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()


def distributed_mode(configured: str) -> tuple[str, str | None]:
    """(train.distributed in effect, the reason when the launcher chose it): `accelerate launch` with
    an FSDP config (distributed_type: FSDP) sets ACCELERATE_USE_FSDP=true, which selects fsdp."""
    if configured == "ddp" and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp", "accelerate's FSDP config (ACCELERATE_USE_FSDP=true) selects train.distributed: fsdp"
    return configured, None


def init_world() -> World:
    """The process group of a torchrun launch, or a one-process world."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(backend)
    return World(size, rank, local_rank)


def shutdown(world: World) -> None:
    if world.size > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
