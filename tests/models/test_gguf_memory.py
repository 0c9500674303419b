"""A GGUF's bytes are held once while loading: each tensor is copied out of a mapping that is gone
before the next is read, and dense tensors are dequantized in row chunks straight into the result."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qlorakit.models import gguf_io
from qlorakit.models.load import load_model
from tests.gguf_tiny import build, tiny_config, write_tiny_gguf

pytestmark = pytest.mark.slow  # writes a tiny GGUF (gguf-py parses SmolLM2's tokenizer for it)


def _types(name, shape):
    return "Q8_0" if name == "token_embd.weight" else ("Q4_K" if name.startswith("blk.") else "F32")


@pytest.fixture(scope="module")
def tiny_gguf(smollm2_path, tmp_path_factory):
    return write_tiny_gguf(build(tiny_config("llama")), tmp_path_factory.mktemp("mem") / "tiny.gguf", smollm2_path, _types)


def _mappings_of(path: Path) -> int:
    """How many memory mappings of `path` this process has now (/proc/self/maps)."""
    target = str(path.resolve())
    return sum(line.rstrip().endswith(target) for line in Path("/proc/self/maps").read_text().splitlines())


def test_no_mapping_outlives_the_copy_of_its_tensor(tiny_gguf, monkeypatch):
    seen = []
    for name in ("block_weight", "dense_tensor"):
        original = getattr(gguf_io, name)

        def spy(path, tensor, original=original, **options):
            result = original(path, tensor, **options)
            seen.append((tensor.name, _mappings_of(tiny_gguf)))
            return result

        monkeypatch.setattr(gguf_io, name, spy)
    loaded = load_model(str(tiny_gguf), dtype="fp32", quant="gguf", progress=False)
    assert len(seen) == len(gguf_io.tensor_index(tiny_gguf))  # every tensor went through a spy
    assert [entry for entry in seen if entry[1]] == []
    assert _mappings_of(tiny_gguf) == 0
    assert loaded.model.model.layers[0].mlp.down_proj.qweight.format == "q4_k"


def test_mapped_blocks_equal_the_copies_and_are_released_with_the_model(tiny_gguf):
    """map_quantized (train.distributed: fsdp): the kept blocks are views of the file, nothing copied
    until a page is used, byte for byte the copies; the mappings go with the model."""
    import gc

    from qlorakit.quant.linear import QuantLinear

    copied = load_model(str(tiny_gguf), dtype="fp32", quant="gguf", progress=False).model
    mapped = load_model(str(tiny_gguf), dtype="fp32", quant="gguf", progress=False, map_quantized=True).model
    assert _mappings_of(tiny_gguf) > 0
    layers = [(n, m) for n, m in mapped.named_modules() if isinstance(m, QuantLinear)]
    assert layers
    for name, layer in layers:
        assert torch.equal(layer.qweight.tensors["blocks"], copied.get_submodule(name).qweight.tensors["blocks"]), name
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(mapped(ids).logits, copied(ids).logits)
    del mapped, layers, layer
    gc.collect()
    assert _mappings_of(tiny_gguf) == 0


def test_chunked_dequantization_equals_gguf_py_whole(tiny_gguf, monkeypatch):
    from gguf import GGUFReader, dequantize

    monkeypatch.setattr(gguf_io, "DEQUANTIZE_CHUNK_BYTES", 3 * 256 * 4)  # 3 rows of the embedding per call
    tensors = {t.name: t for t in GGUFReader(str(tiny_gguf)).tensors}
    for name in ("token_embd.weight", "blk.0.attn_norm.weight", "blk.1.ffn_down.weight"):
        tensor = tensors[name]
        ours = gguf_io.dense_tensor(tiny_gguf, tensor)
        whole = dequantize(tensor.data, tensor.tensor_type).reshape(ours.shape)
        assert np.array_equal(ours.numpy(), whole), name
    assert gguf_io.dense_tensor(tiny_gguf, tensors["token_embd.weight"]).shape == (1024, 256)
