"""A truncated or corrupted GGUF raises qlorakit's GGUFError / ModelSourceError, never a raw
exception. The file is a small valid GGUF written with gguf-py's GGUFWriter (F32, F16, Q4_1, Q8_0
tensors); hypothesis truncates it or flips bytes, then qlorakit reads it the way `load_model` does:
open the reader, read the architecture, dequantize every tensor, wrap every block-format one."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlorakit.models import gguf_io
from qlorakit.models.gguf_io import GGUFError
from qlorakit.models.sources import ModelSourceError

FUZZ = settings(max_examples=100, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _write_small_gguf(path: Path) -> bytes:
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("fuzz")
    writer.add_context_length(64)
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    writer.add_tensor("output_norm.weight", rng.standard_normal(64).astype(np.float32))
    writer.add_tensor("token_embd.weight", rng.standard_normal((8, 64)).astype(np.float16))
    for name, qtype in (("blk.0.attn_q.weight", GGMLQuantizationType.Q4_1), ("blk.0.ffn_up.weight", GGMLQuantizationType.Q8_0)):
        dense = rng.standard_normal((16, 64)).astype(np.float32)  # (out, in)
        writer.add_tensor(name, quantize(dense, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@pytest.fixture(scope="module")
def valid_gguf(tmp_path_factory) -> bytes:
    return _write_small_gguf(tmp_path_factory.mktemp("gguf") / "small.gguf")


_SCRATCH = tempfile.TemporaryDirectory(prefix="qlk-gguf-fuzz-")


def read_like_load_model(path: Path) -> None:
    """What `_load_gguf` does with a file, minus transformers: reader, architecture, every tensor."""
    from qlorakit.quant.gguf_types import GGML_TYPE_TO_FORMAT

    reader = gguf_io.open_reader(path)
    gguf_io.architecture(reader)
    for tensor in reader.tensors:
        gguf_io.dense_tensor(path, tensor)
        if tensor.tensor_type.name in GGML_TYPE_TO_FORMAT:
            gguf_io.block_weight(path, tensor)


def _check(data: bytes) -> None:
    path = Path(_SCRATCH.name) / "fuzzed.gguf"
    path.write_bytes(data)
    try:
        read_like_load_model(path)
    except (GGUFError, ModelSourceError) as error:
        message = str(error).strip()
        assert message and str(path) in message, message


def test_valid_file_reads(valid_gguf, tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(valid_gguf)
    read_like_load_model(path)
    reader = gguf_io.open_reader(path)
    assert gguf_io.architecture(reader) == "llama"
    assert [t.name for t in reader.tensors][-1] == "blk.0.ffn_up.weight"


@FUZZ
@given(fraction=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated(valid_gguf, fraction):
    _check(valid_gguf[: int(len(valid_gguf) * fraction)])


@FUZZ
@given(flips=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=4))
def test_flipped_bytes(valid_gguf, flips):
    data = bytearray(valid_gguf)
    for where, mask in flips:
        data[int(where * len(data))] ^= mask
    _check(bytes(data))


@FUZZ
@given(where=st.integers(0, 400), mask=st.integers(1, 255))
def test_flipped_header_bytes(valid_gguf, where, mask):
    """The first few hundred bytes hold the counts, key names, types and tensor infos."""
    data = bytearray(valid_gguf)
    data[where] ^= mask
    _check(bytes(data))


@pytest.mark.parametrize("field, offset", [("tensor count", 8), ("metadata count", 16)])
def test_a_huge_count_is_refused_from_the_header(valid_gguf, tmp_path, field, offset):
    """A count of 2^60 is named as such (gguf-py itself fails later with a bare IndexError)."""
    data = bytearray(valid_gguf)
    data[offset : offset + 8] = (1 << 60).to_bytes(8, "little")
    path = tmp_path / "huge-count.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="header claims .* more than its .* bytes can hold") as error:
        gguf_io.open_reader(path)
    assert str(path) in str(error.value)
    valid = tmp_path / "ok.gguf"
    valid.write_bytes(valid_gguf)
    gguf_io.check_header_counts(valid)  # the untouched file passes
