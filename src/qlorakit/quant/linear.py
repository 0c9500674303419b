"""QuantLinear: a frozen linear layer whose weight is stored in a QuantFormat.

    y = x · dequantize(W_q)ᵀ + b,   x: (..., in_features), y: (..., out_features)

The dense weight exists only inside `dequantized_matmul`: it is rebuilt for the forward and
again for the backward (gradient with respect to x only: the base weight is frozen), so a
step never keeps a 16-bit copy of the model alive. It is rebuilt into a per-thread buffer, one
per (shape, dtype) on the CPU, so that a step does not fault in fresh pages for every layer's
weight twice (SmolLM2: 420 dense weights of up to 3.5 MiB per step). Every call order (generate, then train, then
merge) is correct because the stored codes are never modified in place, unlike bitsandbytes
0.50.2's `nn.Linear4bit`, which repacks its weight on the first no-grad CPU forward.

Storage. By default each tensor of the QuantizedWeight (codes, scales, nested statistics) is a
buffer `qweight_<name>`. `store_as_parameter()` moves them into one frozen 1-D uint8 parameter,
`qweight_storage`, for FSDP, which shards parameters and replicates buffers (train/fsdp.py):

    qweight_storage = [ tensor_0 bytes | pad | tensor_1 bytes | pad | ... ]   (Σ bytes,) uint8

each tensor starting at a multiple of STORAGE_ALIGNMENT bytes and read back as a view of its
dtype and shape, the way bitsandbytes' `quant_storage` lets FSDP flatten 4-bit weights with
everything else. One storage dtype serves every format.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Callable

import torch
from torch import Tensor, nn

from qlorakit.quant.base import QuantFormat, QuantizedWeight


_scratch = threading.local()
STORAGE_ALIGNMENT = 16  # bytes: every tensor in a flat storage starts on a multiple (fp32/fp16 views need it)


def scratch_buffer(role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """This thread's reusable buffer for `role`, viewed as `shape`, or None off the CPU: for a
    tensor that lives for one matmul (a dense weight, a dropped-out adapter input). On the CPU a
    fresh tensor of a few MiB comes from mmap and is faulted in page by page on every use; CUDA's
    caching allocator already reuses freed blocks, where a persistent buffer would only add memory.

    One flat buffer per (role, dtype, device), grown to the largest request and viewed as each
    shape: batches of different lengths (padded rows) reuse it, where a buffer per shape would add
    one for every length seen. A view is valid until the next call for the same role."""
    device = torch.device(device)
    if device.type != "cpu":
        return None
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (role, dtype, device)
    numel = math.prod(shape)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(shape)


def release_scratch_buffers() -> None:
    """Drop this thread's scratch buffers (training calls it when it ends; the next use allocates anew)."""
    _scratch.__dict__.pop("buffers", None)


class _DequantizedMatmul(torch.autograd.Function):
    """x @ W.T with W rebuilt by `dequantize()` in forward and backward (never saved)."""

    @staticmethod
    def forward(ctx, x: Tensor, dequantize: Callable[[], Tensor]) -> Tensor:
        ctx.dequantize = dequantize
        return x @ dequantize().t()  # (..., in) @ (in, out) -> (..., out)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad_output @ ctx.dequantize(), None  # (..., out) @ (out, in) -> (..., in)


def dequantized_matmul(x: Tensor, dequantize: Callable[[], Tensor]) -> Tensor:
    """x @ dequantize().T without keeping the dense weight for the backward pass."""
    if not torch.is_grad_enabled() or not x.requires_grad:
        return x @ dequantize().t()  # (..., out)
    return _DequantizedMatmul.apply(x, dequantize)


class QuantLinear(nn.Module):
    """Linear layer over a quantized, frozen weight.

    Args:
        qweight: the quantized (out_features, in_features) weight.
        fmt: the format that reads it back.
        bias: optional (out_features,) bias, kept frozen in `compute_dtype`.
        compute_dtype: dtype of the matmul (bf16, fp16 or fp32); inputs are cast to it.
        source_layout: "linear" for nn.Linear, "conv1d" for GPT-2's Conv1D whose dense weight
            is stored (in_features, out_features); merges and exports restore that layout.
    """

    def __init__(
        self,
        qweight: QuantizedWeight,
        fmt: QuantFormat,
        bias: Tensor | None = None,
        compute_dtype: torch.dtype = torch.bfloat16,
        source_layout: str = "linear",
    ):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.fmt = fmt
        self.group_size = qweight.group_size
        self.options = dict(qweight.options)
        self.compute_dtype = compute_dtype
        self.source_layout = source_layout
        self._tensor_names = list(qweight.tensors)
        self._storage_layout: StorageLayout | None = None  # see store_as_parameter
        for name, tensor in qweight.tensors.items():
            self.register_buffer(f"qweight_{name}", tensor)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.dense_cache: Tensor | None = None  # see `cached_dense_weights`

    @classmethod
    def from_dense(
        cls, module: nn.Module, fmt: QuantFormat, compute_dtype: torch.dtype = torch.bfloat16
    ) -> "QuantLinear":
        """Quantize an nn.Linear or a transformers Conv1D (weight (in, out)) into a QuantLinear."""
        weight, layout = dense_weight_of(module)
        return cls(fmt.quantize(weight), fmt, module.bias, compute_dtype, layout)

    @property
    def qweight(self) -> QuantizedWeight:
        if self._storage_layout is None:
            tensors = {name: getattr(self, f"qweight_{name}") for name in self._tensor_names}
        else:
            tensors = unpack_storage(self.qweight_storage, self._storage_layout)
        return QuantizedWeight(self.fmt.name, (self.out_features, self.in_features), self.group_size, tensors, self.options)

    @property
    def storage_device(self) -> torch.device:
        if self._storage_layout is not None:
            return self.qweight_storage.device
        return self._buffers[f"qweight_{self._tensor_names[0]}"].device

    @property
    def stores_as_parameter(self) -> bool:
        return self._storage_layout is not None

    def store_as_parameter(self, packed: tuple[Tensor, StorageLayout] | None = None) -> None:
        """Move the stored tensors into the one frozen uint8 parameter `qweight_storage` (module
        docstring); the values, and every result computed from them, stay the same.

        packed: (storage, layout) of `pack_storage` that already holds exactly this layer's tensors
        (a quantized cache read as a memory map, models/load.py): it becomes the parameter as it is,
        nothing copied, so FSDP later reads only the pages of each rank's shard.
        """
        if self._storage_layout is not None:
            return
        tensors = {name: self._buffers.pop(f"qweight_{name}") for name in self._tensor_names}
        if packed is None:
            storage, layout = pack_storage(tensors)
        else:
            storage, layout = packed
            shapes = {name: (tensor.dtype, tuple(tensor.shape)) for name, tensor in tensors.items()}
            if {name: (dtype, shape) for name, (dtype, shape, _) in layout.items()} != shapes:
                raise ValueError(f"store_as_parameter: the packed layout {layout} does not hold this layer's tensors {shapes}")
        self._storage_layout = layout
        self.qweight_storage = nn.Parameter(storage, requires_grad=False)

    def set_qweight(self, qweight: QuantizedWeight) -> None:
        """Replace the stored quantized weight (same format and shape)."""
        if qweight.shape != (self.out_features, self.in_features) or qweight.format != self.fmt.name:
            raise ValueError(f"expected a {self.fmt.name} weight of shape {(self.out_features, self.in_features)}")
        if self._storage_layout is not None:
            raise ValueError("set_qweight: this layer keeps its weight as a flat parameter (store_as_parameter)")
        for name, tensor in qweight.tensors.items():
            setattr(self, f"qweight_{name}", tensor)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense (out_features, in_features) weight in `dtype` (default: compute dtype)."""
        dtype = dtype or self.compute_dtype
        if self.dense_cache is not None and self.dense_cache.dtype == dtype:
            return self.dense_cache
        return self.fmt.dequantize(self.qweight, dtype)

    def _dequantize_for_matmul(self) -> Tensor:
        """The dense weight in compute dtype, in this thread's scratch buffer: valid until the next
        call for any quantized weight, so only for a matmul that consumes it at once."""
        if self.dense_cache is not None and self.dense_cache.dtype == self.compute_dtype:
            return self.dense_cache
        out = scratch_buffer("dense_weight", (self.out_features, self.in_features), self.compute_dtype, self.storage_device)
        return self.fmt.dequantize(self.qweight, self.compute_dtype, out=out)  # out None: a fresh tensor

    def forward(self, x: Tensor) -> Tensor:
        y = dequantized_matmul(x.to(self.compute_dtype), self._dequantize_for_matmul)  # (..., out)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.name}, "
            f"group_size={self.group_size}, compute_dtype={self.compute_dtype}, bias={self.bias is not None}"
        )


StorageLayout = dict[str, tuple[torch.dtype, tuple[int, ...], int]]  # name -> (dtype, shape, byte offset)


def pack_storage(tensors: dict[str, Tensor]) -> tuple[Tensor, StorageLayout]:
    """The tensors of a QuantizedWeight as one flat uint8 tensor and where each one starts in it
    (module docstring). A single contiguous uint8 tensor (GGUF blocks) is taken as it is, without a
    copy, so a memory map stays one."""
    layout, offset, end = {}, 0, 0
    for name, tensor in tensors.items():
        layout[name] = (tensor.dtype, tuple(tensor.shape), offset)
        end = offset + tensor.numel() * tensor.element_size()
        offset = -(-end // STORAGE_ALIGNMENT) * STORAGE_ALIGNMENT
    only = next(iter(tensors.values()))
    if len(tensors) == 1 and only.dtype == torch.uint8 and only.is_contiguous():
        return only.view(-1), layout  # (Σ bytes,)
    storage = torch.zeros(end, dtype=torch.uint8, device=only.device)  # (Σ aligned bytes,)
    for name, view in unpack_storage(storage, layout).items():
        view.copy_(tensors[name])
    return storage, layout


def unpack_storage(storage: Tensor, layout: StorageLayout) -> dict[str, Tensor]:
    """name -> the tensor (dtype, shape) that starts at its byte offset in a flat uint8 `storage`
    (views, no copies)."""
    views = {}
    for name, (dtype, shape, offset) in layout.items():
        nbytes = math.prod(shape) * dtype.itemsize
        views[name] = storage[offset : offset + nbytes].view(dtype).view(shape)
    return views


@contextlib.contextmanager
def cached_dense_weights(model: nn.Module):
    """Inside this block every QuantLinear of `model` keeps its dense weight (compute dtype).

    For inference that runs many small forwards (generation, probe sets): one dequantization per
    layer instead of one per token, at the cost of a dense copy of the quantized weights.
    """
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    try:
        for layer in layers:
            layer.dense_cache = layer.fmt.dequantize(layer.qweight, layer.compute_dtype)
        yield model
    finally:
        for layer in layers:
            layer.dense_cache = None


def dense_weight_of(module: nn.Module) -> tuple[Tensor, str]:
    """(weight as (out_features, in_features), layout) for nn.Linear, Conv1D or QuantLinear."""
    if isinstance(module, QuantLinear):
        return module.dequantize_weight(torch.float32), module.source_layout
    if isinstance(module, nn.Linear):
        return module.weight, "linear"
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight (in, out)
        return module.weight.t(), "conv1d"
    raise TypeError(f"not a linear layer: {type(module).__name__}")


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear-like module, or None if it is not one."""
    if isinstance(module, (nn.Linear, QuantLinear)):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        in_features, out_features = module.weight.shape
        return in_features, out_features
    return None
