"""The quantization-format interface every 4-bit (and 8-bit) base format implements.

A format turns a dense weight of shape (out_features, in_features) into a `QuantizedWeight`
(a handful of named tensors plus the few numbers needed to read them back) and back again.
Quantization always runs along `in_features`, in groups of `group_size` consecutive values, so
row r of the weight owns groups [r * in_features / group_size, (r + 1) * in_features / group_size).

Adding a format means one file with one `QuantFormat` subclass and one line in `registry.py`;
the contract test in tests/quant/test_contract.py then checks it (round-trip bound,
serialization round-trip, golden bytes).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor


class QuantizationError(ValueError):
    """A weight cannot be quantized in the requested format (shape, dtype, group size)."""


@dataclass
class QuantizedWeight:
    """A quantized (out_features, in_features) weight.

    Attributes:
        format: registry key of the format that wrote it ("nf4", "q4_1", ...).
        shape: (out_features, in_features) of the dense weight.
        group_size: consecutive values along in_features that share one scale (and zero/min).
        tensors: format-specific storage, e.g. packed codes and per-group scales.
        options: format-specific scalars needed to read `tensors` back (JSON-serialisable).
    """

    format: str
    shape: tuple[int, int]
    group_size: int
    tensors: dict[str, Tensor]
    options: dict = field(default_factory=dict)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        return QuantizedWeight(
            self.format,
            self.shape,
            self.group_size,
            {k: v.to(device) for k, v in self.tensors.items()},
            dict(self.options),
        )

    def nbytes(self) -> int:
        """Bytes of storage, all tensors included (codes, scales, nested statistics)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class QuantFormat(abc.ABC):
    """One block/group quantization format.

    Subclasses set `name` (the registry key, file name and YAML value), `bits`, and whether the
    format stores a per-group zero point or min (`has_group_min`), which is what lets a QA-LoRA
    update fold into it exactly.
    """

    name: ClassVar[str]
    bits: ClassVar[int]
    default_group_size: ClassVar[int] = 64
    stats_bytes_per_group: ClassVar[int] = 0  # scale (+ zero/min) bytes stored per group
    has_group_min: ClassVar[bool] = False
    symmetric: ClassVar[bool] = True

    def __init__(self, group_size: int):
        if group_size <= 0:
            raise QuantizationError(f"group_size must be positive, got {group_size}")
        self.group_size = group_size

    def options(self) -> dict:
        """The scalars a QuantizedWeight of this format carries in `options`."""
        return {}

    @abc.abstractmethod
    def quantize(self, weight: Tensor) -> QuantizedWeight:
        """Quantize a dense (out_features, in_features) weight; any float dtype."""

    @abc.abstractmethod
    def dequantize(self, q: QuantizedWeight, dtype: torch.dtype = torch.float32, out: Tensor | None = None) -> Tensor:
        """Return the dense (out_features, in_features) weight in `dtype`.

        With `out` (a contiguous (out_features, in_features) tensor of `dtype`) the weight is
        written there and `out` is returned; QuantLinear reuses one such buffer per shape."""

    def storage_bytes(self, out_features: int, in_features: int) -> tuple[int, int]:
        """(bytes of codes, bytes of per-group statistics) for a weight of this shape, without
        quantizing anything (used by `inspect` and `plan`)."""
        n = out_features * in_features
        return n * self.bits // 8, -(-n // self.group_size) * self.stats_bytes_per_group

    def check_shape(self, weight: Tensor) -> tuple[int, int]:
        if weight.dim() != 2:
            raise QuantizationError(f"{self.name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
        if not weight.is_floating_point():
            raise QuantizationError(f"{self.name}: expected a float weight, got {weight.dtype}")
        out_features, in_features = weight.shape
        if (out_features * in_features) % self.group_size:
            raise QuantizationError(
                f"{self.name}: {out_features}x{in_features} weight has {out_features * in_features} values, "
                f"not a multiple of group_size {self.group_size}"
            )
        return out_features, in_features

    def __repr__(self) -> str:
        return f"{type(self).__name__}(group_size={self.group_size})"


def written_to(out: Tensor | None, dense: Tensor) -> Tensor:
    """`dense`, or `out` holding a copy of it (for formats that cannot write into `out` directly)."""
    return dense if out is None else out.copy_(dense)

