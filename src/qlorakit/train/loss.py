"""The training loss without the full logits tensor: chunked cross-entropy over the output head.

transformers computes `logits = lm_head(h)` for every position, (B, T, V), up-casts them to fp32
and takes the cross-entropy: with SmolLM2's 49,152-token vocabulary and 4 x 256 tokens that is
200 MB of fp32 logits, as much again for log-softmax and its gradient. Here the loss is

    L = (1 / N) Σ_t [label_t ≠ -100] (logsumexp(W h_t) − (W h_t)[label_t]),   N = num_items,

computed over chunks of the positions that have a label (masked prompt tokens are skipped: their
logits are never needed), and the gradient is formed chunk by chunk in the same pass,

    ∂L/∂h_t = (1 / N) (softmax(W h_t) − onehot(label_t)) W,

so only one (chunk, V) block of logits exists at a time and the backward is a multiplication
by the saved (B, T, d) gradient. Labels are shifted the way transformers shifts them (position t
predicts label t + 1). Logits come out of the matmul in the head's dtype and are up-cast, as in
transformers, so the loss and gradients match `model(..., labels=...).loss` (tests/train/test_loss.py).

Used only where logits are exactly `lm_head(hidden)` with a frozen, bias-free head (no soft-
capping or logit scaling): `supports_chunked_loss`; everything else takes transformers' loss.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qlorakit.models.architectures import PLAIN_HEAD_MODELS
from qlorakit.quant.linear import scratch_buffer

IGNORE_INDEX = -100
CHUNK_TOKENS = 256  # a (256, V) block: at V = 49,152 and fp32, 48 MiB; matmuls of 256 rows still run at full speed


def _chunk_loss(hidden: Tensor, weight: Tensor, target: Tensor, scale: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Σ cross-entropy of one chunk and, if `need_grad`, its ∂L/∂hidden (c, d).

    hidden: (c, d); weight: (V, d); target: (c,). The (c, V) logits block is the only large
    tensor: it becomes exp(z − max), then scale · softmax, in place (no logsumexp temporary):

        lse = max + log Σ exp(z − max),   loss = Σ (lse − z[target]),
        ∂L/∂z = scale · (softmax(z) − onehot(target))

    The block and its head-dtype twin live in this thread's reusable buffers (`scratch_buffer`):
    a fresh (256, V) fp32 block is 48 MiB, above the 32 MiB mmap threshold of a bf16 run
    (qlorakit/allocator.py), and was faulted in page by page for every chunk: 254-308 against
    205-209 ms for the loss of a SmolLM2 4 x 256 batch, forward and backward.
    """
    shape = (hidden.shape[0], weight.shape[0])  # (c, V)
    head_out = torch.matmul(hidden, weight.t(), out=scratch_buffer("logits", shape, weight.dtype, hidden.device))  # (c, V)
    logits = head_out
    if head_out.dtype != torch.float32:  # up-cast, as transformers does
        logits = scratch_buffer("logits_fp32", shape, torch.float32, hidden.device)
        logits = head_out.float() if logits is None else logits.copy_(head_out)  # (c, V)
    target_logit = logits.gather(1, target[:, None]).squeeze(1)  # (c,)
    peak = logits.amax(dim=-1, keepdim=True)  # (c, 1)
    exp = logits.sub_(peak).exp_()  # (c, V), in place
    sums = exp.sum(dim=-1, keepdim=True)  # (c, 1)
    loss_sum = (sums.log() + peak).squeeze(1).sub_(target_logit).sum()
    if not need_grad:
        return loss_sum, None
    grad_logits = exp.mul_(scale / sums)  # scale · softmax, in place: (c, V)
    grad_logits[torch.arange(target.numel(), device=exp.device), target] -= scale
    grad_head = grad_logits if head_out is logits else head_out.copy_(grad_logits)  # (c, V) in the head's dtype
    return loss_sum, grad_head @ weight  # (c, V) @ (V, d)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, scale: Tensor, chunk: int, need_grad: bool) -> Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])  # (B·T, d)
        targets = labels.reshape(-1)  # (B·T,)
        rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # (n,) positions that carry a loss
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.zeros_like(flat) if need_grad else None
        for start in range(0, rows.numel(), chunk):
            index = rows[start : start + chunk]  # (c,)
            loss_sum, grad_rows = _chunk_loss(flat[index], weight, targets[index], scale, need_grad)
            total += loss_sum
            if grad is not None:
                grad[index] = grad_rows.to(flat.dtype)
        ctx.save_for_backward(grad)
        ctx.shape = hidden.shape
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss.to(grad.dtype)).reshape(ctx.shape), None, None, None, None, None


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, num_items: int | Tensor,
                          chunk: int = CHUNK_TOKENS) -> Tensor:
    """Σ token cross-entropy / num_items of `lm_head(hidden)` against next-token `labels`.

    hidden: (B, T, d); weight: (V, d), frozen; labels: (B, T) unshifted, -100 where no loss.
    """
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T): position t predicts t + 1
    scale = 1.0 / torch.as_tensor(num_items, dtype=torch.float32, device=hidden.device)
    need_grad = torch.is_grad_enabled() and hidden.requires_grad  # evaluation skips the gradient
    return _ChunkedCrossEntropy.apply(hidden, weight, shifted.to(hidden.device), scale, chunk, need_grad)


def supports_chunked_loss(model: nn.Module) -> bool:
    """True when the model's logits are exactly a frozen, bias-free nn.Linear head over the last
    hidden state (see PLAIN_HEAD_MODELS); a LoRA- or quantized head keeps transformers' path."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (
        type(model).__name__ in PLAIN_HEAD_MODELS
        and type(head) is nn.Linear
        and head.bias is None
        and not head.weight.requires_grad
    )


def causal_lm_loss(model: nn.Module, batch: dict[str, Tensor], num_items: int) -> Tensor:
    """Σ token loss / num_items for a training batch (input_ids, labels, attention_mask or position_ids)."""
    if not supports_chunked_loss(model):
        return model(**batch, use_cache=False, num_items_in_batch=torch.tensor(num_items, device=batch["labels"].device)).loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state  # (B, T, d)
    return chunked_cross_entropy(hidden, model.get_output_embeddings().weight, batch["labels"], num_items)
