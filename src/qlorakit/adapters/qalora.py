"""QA-LoRA (Xu et al. 2023, arXiv 2309.14717): LoRA whose input is pooled over groups.

With pooling group size G along in_features (a multiple of the base format's group size):

    x̄_g = (in_features / G) · mean(x[g·G : (g+1)·G]),   g = 0 .. in_features/G - 1
    y   = base(x) + s · B A x̄,    A: (r, in_features / G),  B: (out_features, r)

which is exactly peft 0.21.2's `QALoraLinearVariant` (mean over each group, times the number
of groups), so an adapter file means the same thing in both tools. The dense update is
constant inside each group,

    ΔW[o, i] = s · (in_features / G) / G · (B A)[o, i // G],

so it folds exactly into a per-group zero point or min of the base format (merge/zero_point.py)
instead of needing a dequantize-and-requantize merge.
"""

from __future__ import annotations

from torch import Tensor, nn

from qlorakit.adapters.lora import LoraLinear


class QALoraLinear(LoraLinear):
    """LoRA with group-pooled input; `group_size` is the pooling group G."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, group_size: int, dropout: float = 0.0, use_rslora: bool = False):
        self.group_size = group_size
        in_features = getattr(base_layer, "in_features", None) or base_layer.weight.shape[0]
        if in_features % group_size:
            raise ValueError(f"QA-LoRA group size {group_size} does not divide in_features {in_features}")
        super().__init__(base_layer, r, alpha, dropout, use_rslora)

    @property
    def n_groups(self) -> int:
        return self.in_features // self.group_size

    @property
    def adapter_in_features(self) -> int:
        return self.n_groups

    @property
    def pooling_group_size(self) -> int:
        return self.group_size

    def group_delta(self) -> Tensor:
        """Per-group update ΔW_g = s · (in/G) / G · B A, shape (out_features, in_features / G), fp32."""
        ba = self.lora_B.weight.float() @ self.lora_A.weight.float()  # (out, r) @ (r, in/G)
        return ba.mul_(self.scaling * self.n_groups / self.group_size)

    def delta_weight(self) -> Tensor:
        """Dense (out_features, in_features) update: each group's value repeated G times."""
        return self.group_delta().repeat_interleave(self.group_size, dim=1)  # (out, in/G) -> (out, in)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"
