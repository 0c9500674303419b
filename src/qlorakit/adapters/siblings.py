"""Sibling projections that read one input (q, k and v; gate and up) computed as one layer.

For n LoRA layers i = 1..n over quantized bases W_i (out_i, in), all reading the same x:

    W    = [W_1; …; W_n]                  (Σout, in)     dequantized into one buffer
    A    = [A_1; …; A_n]                  (n·r, in)
    B_bd = blockdiag(B_1, …, B_n)         (Σout, n·r)
    h    = (x̃ Aᵀ) ⊙ c,  c_j = s_i / (1 − p) for the columns j of layer i          (N, n·r)
    Y    = x Wᵀ + h B_bdᵀ                 (N, Σout);  y_i = Y[:, columns of layer i]

which is each layer's y_i = x W_iᵀ + s_i · B_i A_i dropout(x) (adapters/update.py): x̃ is x with
the dropped elements zeroed at the one draw of positions the siblings already share; 1/(1 − p) is in c.
Backward, from g_Y = [g_1 … g_n]:

    g_x   = g_Y W + ((g_Y B_bd ⊙ s) / (1 − p)) A, zeroed where x was dropped
    g_B_i = block i of g_Yᵀ h,   g_A_i = rows of layer i of (g_Y B_bd ⊙ s)ᵀ x̃ / (1 − p)

One dequantized matmul, one x̃ Aᵀ, one addmm and one autograd node where there were n of each
(and n more for the base layers): a SmolLM2 step's linear layers make 180 autograd nodes instead
of 420, with their Python dispatch and per-node gradient sums. The block-diagonal B costs n times
the rank-r FLOPs, which are under 1% of the base matmul's.

`group_sibling_projections` makes the q_proj/k_proj/v_proj children of a module, and its
gate_proj/up_proj, `SiblingLoraLinear` layers of one `SiblingGroup` when all are plain LoRA
layers (they show as such in `print(model)`; the state dict is unchanged), and
`ungroup_sibling_projections` puts the plain LoraLinear layers back. A group fuses only where it
is the same computation: every member called with the very same tensor (each member otherwise
computes its own output from its own input), plain LoRA over a QuantLinear without bias, bf16
compute on the CPU, with gradients enabled (training). Anything else — QA-LoRA, fp32 or
fp16 compute, a disabled adapter, a cached dense weight, no-grad inference, CUDA (where
bitsandbytes' kernels dequantize and this path is untested) — takes each layer's own path, so
merges and generation are unaffected.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from qlorakit.adapters.lora import LoraLinear
from qlorakit.adapters.update import shared_dropout_positions, zero_dropped_, zeroed_input
from qlorakit.quant.linear import QuantLinear, scratch_buffer

SIBLING_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Children of one module that read the same input in the Llama family's attention and MLP."""


class SiblingGroup:
    """The LoraLinear layers of one module that read the same input, in call order. The first
    member called with x computes every member's output; the others collect theirs."""

    def __init__(self, members: list[LoraLinear]):
        self.members = members
        self.out_features = [m.out_features for m in members]
        self.ranks = [m.r for m in members]
        self._pending: dict[int, Tensor] = {}  # member index -> its output for the input below
        self._input: tuple[weakref.ref, int] | None = None  # (x, x._version) the pending outputs are for

    def fusable(self, x: Tensor) -> bool:
        """Whether the fused path computes exactly what each member's own forward would."""
        if not (torch.is_grad_enabled() and x.dtype == torch.bfloat16 and x.device.type == "cpu"):
            return False
        first = self.members[0]
        for m in self.members:
            base = m.base_layer
            if (type(m) is not SiblingLoraLinear or m.disabled or m.training != first.training or m.dropout_p() != first.dropout_p()
                    or not isinstance(base, QuantLinear) or base.bias is not None or base.compute_dtype != torch.bfloat16
                    or base.dense_cache is not None or m.in_features != first.in_features):
                return False
        return True

    def output(self, member: LoraLinear, x: Tensor) -> Tensor | None:
        """`member`'s output for x, computing the whole group's on the first call; None when the
        group does not apply (the member then runs its own forward)."""
        index = self.members.index(member)
        cached = self._input
        if cached is not None and cached[0]() is x and cached[1] == x._version and index in self._pending:
            return self._pending.pop(index)
        if not self.fusable(x):
            return None
        outputs = sibling_projections(x, self)
        self._pending = {i: y for i, y in enumerate(outputs) if i != index}
        self._input = (weakref.ref(x), x._version)
        return outputs[index]

    def dense_weight(self) -> Tensor:
        """[W_1; …; W_n] in bf16, (Σout, in), in this thread's scratch buffer (valid until the next call)."""
        first = self.members[0].base_layer
        shape = (sum(self.out_features), first.in_features)
        device = first.storage_device
        out = scratch_buffer("sibling_weight", shape, torch.bfloat16, device)  # the path runs on the CPU only
        row = 0
        for m in self.members:
            base = m.base_layer
            base.fmt.dequantize(base.qweight, torch.bfloat16, out=out[row : row + base.out_features])  # (out_i, in)
            row += base.out_features
        return out


def sibling_projections(x: Tensor, group: SiblingGroup) -> tuple[Tensor, ...]:
    """(y_1, …, y_n): each member's base(x) + s_i · B_i A_i dropout(x), as one computation
    (module docstring). Each y_i is a column view of one (…, Σout) tensor."""
    members = group.members
    p = members[0].dropout_p()
    drop = shared_dropout_positions(x, p) if members[0].training and p > 0 else None  # flat positions, (k,)
    weights = [m.lora_A.weight for m in members] + [m.lora_B.weight for m in members]
    return _SiblingProjections.apply(x, drop, 1.0 - p, group, *weights)


class _SiblingProjections(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, drop, keep, group, *weights):
        n = len(group.members)
        lora_A, lora_B = weights[:n], weights[n:]
        m = torch.bfloat16
        lead, in_features = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, in_features)  # (N, in)
        y = x2 @ group.dense_weight().t()  # (N, in) @ (in, Σout) -> (N, Σout)
        u = zeroed_input(x, drop, None, m).reshape(-1, in_features)  # x̃ without 1/(1 − p), (N, in)
        a_all = torch.cat(lora_A).to(m)  # (n·r, in)
        b_bd = torch.block_diag(*lora_B).to(m)  # (Σout, n·r)
        scale = _column_scale(group, 1.0 / keep if drop is not None else 1.0, x.device)  # (n·r,) fp32
        h = (u @ a_all.t()).float().mul_(scale)  # s·h, (N, n·r) fp32
        y.addmm_(h.to(m), b_bd.t())  # + h B_bdᵀ
        ctx.save_for_backward(x, drop, h, a_all, b_bd)
        ctx.group, ctx.keep = group, keep
        y = y.view(*lead, y.shape[-1])  # (..., Σout)
        return tuple(y.split(group.out_features, dim=-1))  # (..., out_i) each

    @staticmethod
    def backward(ctx, *grad_outputs):
        x, drop, h, a_all, b_bd = ctx.saved_tensors
        group, m = ctx.group, torch.bfloat16
        n = len(group.members)
        keep = ctx.keep if drop is not None else 1.0
        in_features = x.shape[-1]
        rows = x.numel() // in_features
        grad_y = scratch_buffer("sibling_grad", (rows, sum(group.out_features)), m, x.device)
        grad_y = torch.cat([_grad_or_zeros(g, x, width).reshape(rows, width) for g, width in zip(grad_outputs, group.out_features)],
                           dim=-1, out=grad_y)  # (N, Σout)
        grad_x = grad_y @ group.dense_weight()  # (N, Σout) @ (Σout, in) -> (N, in)
        grad_h = (grad_y @ b_bd).float().mul_(_column_scale(group, 1.0, x.device))  # (N, n·r) fp32
        grad_A = grad_B = (None,) * n
        if any(ctx.needs_input_grad[4 + n :]):
            grad_b_bd = (grad_y.t() @ h.to(m)).float()  # (Σout, n·r)
            grad_B = tuple(grad_b_bd[o0:o1, r0:r1] for (o0, o1), (r0, r1) in _blocks(group.out_features, group.ranks))
        if any(ctx.needs_input_grad[4 : 4 + n]):
            u = zeroed_input(x, drop, None, m).reshape(rows, in_features)  # rebuilt x̃, (N, in)
            grad_a_all = (grad_h.to(m).t() @ u).float().div_(keep)  # (n·r, in)
            grad_A = tuple(grad_a_all.split(group.ranks, dim=0))
        grad_u = ((grad_h / keep).to(m) @ a_all).view(x.shape)  # (..., in)
        if drop is not None:
            grad_u = zero_dropped_(grad_u, drop)
        grad_x = grad_x.view(x.shape).add_(grad_u)
        return (grad_x, None, None, None, *grad_A, *grad_B)


def _column_scale(group: SiblingGroup, factor: float, device) -> Tensor:
    """(n·r,) fp32: s_i · factor on the r columns of layer i."""
    return torch.tensor([m.scaling * factor for m in group.members for _ in range(m.r)], dtype=torch.float32, device=device)


def _blocks(out_features: list[int], ranks: list[int]):
    """((row range), (column range)) of each layer's block in B_bd."""
    o = r = 0
    for width, rank in zip(out_features, ranks):
        yield (o, o + width), (r, r + rank)
        o, r = o + width, r + rank


def _grad_or_zeros(grad: Tensor | None, x: Tensor, width: int) -> Tensor:
    """An output's gradient in bf16, or zeros for an output the loss did not use."""
    if grad is None:
        return torch.zeros(*x.shape[:-1], width, dtype=torch.bfloat16, device=x.device)
    return grad.to(torch.bfloat16)


class SiblingLoraLinear(LoraLinear):
    """A LoraLinear that belongs to a SiblingGroup: its forward asks the group first, which computes
    every member's output in one pass where it can (module docstring). Built from a LoraLinear by
    `adopt`, sharing its base layer and adapter parameters (same state-dict names)."""

    group: SiblingGroup

    @classmethod
    def adopt(cls, layer: LoraLinear) -> "SiblingLoraLinear":
        return _same_layer_as(cls, layer)

    def forward(self, x: Tensor) -> Tensor:
        y = self.group.output(self, x)
        return y if y is not None else super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sibling {self.group.members.index(self) + 1} of {len(self.group.members)}"


def group_sibling_projections(model: nn.Module) -> int:
    """Make the q/k/v LoRA layers of every module that has all three, and its gate/up ones, the
    SiblingLoraLinear members of one SiblingGroup each; returns how many groups. Call after adding
    adapters (and `use_fused_kernels`, whose FusedSwiGLU keeps the gate/up children)."""
    groups = 0
    for module in list(model.modules()):
        for names in SIBLING_NAMES:
            layers = [getattr(module, name, None) for name in names]
            if not all(type(layer) is LoraLinear for layer in layers):
                continue
            members = [SiblingLoraLinear.adopt(layer) for layer in layers]
            group = SiblingGroup(members)
            for name, member in zip(names, members):
                object.__setattr__(member, "group", group)  # a plain attribute: not a submodule, not in the state dict
                setattr(module, name, member)
            groups += 1
    return groups


def ungroup_sibling_projections(model: nn.Module) -> int:
    """Put plain LoraLinear layers back where `group_sibling_projections` put members (same base
    layers and adapter parameters); returns how many layers."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is SiblingLoraLinear:
                layer = _same_layer_as(LoraLinear, child)
                setattr(module, name, layer)
                count += 1
    return count


def _same_layer_as(cls: type, layer: LoraLinear) -> LoraLinear:
    """A `cls` instance holding `layer`'s plain attributes (r, scaling, disabled, training, ...; not
    its group) and the very same child modules (base_layer, lora_A, lora_B, lora_dropout): the same
    layer under another class, with the same state-dict names."""
    twin = cls.__new__(cls)
    nn.Module.__init__(twin)
    for key, value in vars(layer).items():
        if not key.startswith("_") and key != "group":
            object.__setattr__(twin, key, value)
    for name, child in layer.named_children():
        twin.add_module(name, child)
    return twin
