"""Loading memory: a dense checkpoint is quantized tensor by tensor (the dense model never exists
whole), and `map_quantized` reads the quantized cache as a memory map that nothing copies.

The peak is measured in a fresh process (ru_maxrss, so loading is all it has done), against the
sizes the checkpoint itself states."""

from __future__ import annotations

import gc
import json
import subprocess
import sys

import pytest
import torch

from qlorakit.models.load import load_model
from qlorakit.quant.linear import QuantLinear
from tests.conftest import save_tiny_llama

PEAK_WORKER = """
import json, resource, sys
from qlorakit.models.load import load_model, load_tokenizer
load_tokenizer(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loaded = load_model(sys.argv[1], dtype="fp32", quant="nf4", progress=False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"grew_kib": after - before}))
"""


def _wide_model(path, tokenizer):
    """8 decoder layers of 512 -> 4096 MLPs: 234 MiB of fp32 linear weights, 96 MiB of embeddings."""
    return save_tiny_llama(path, tokenizer, hidden_size=512, intermediate_size=4096, num_hidden_layers=8,
                           num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True)


def _load_peak_mib(model_dir, cache_dir) -> float:
    import os

    # glibc's mmap threshold as a training run on the CPU fixes it (qlorakit/allocator.py), so that
    # freed tensors leave the peak instead of staying in the heap.
    env = {**os.environ, "QLORAKIT_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "1048576"}
    out = subprocess.run([sys.executable, "-c", PEAK_WORKER, str(model_dir)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["grew_kib"] / 1024


@pytest.mark.slow
def test_a_dense_checkpoint_is_quantized_without_a_dense_copy_of_the_model(tmp_path, smollm2_tokenizer):
    from transformers import AutoConfig

    model_dir = _wide_model(tmp_path / "wide", smollm2_tokenizer)
    config = AutoConfig.from_pretrained(model_dir)
    embed_mib = config.vocab_size * config.hidden_size * 4 / 2**20
    layer = config.hidden_size * (config.hidden_size * 2 + 2 * config.hidden_size // 2) + 3 * config.hidden_size * config.intermediate_size
    linear_mib = config.num_hidden_layers * layer * 4 / 2**20  # fp32 q, k, v, o, gate, up, down
    assert linear_mib > 200
    dense_mib = embed_mib + linear_mib
    cold = _load_peak_mib(model_dir, tmp_path / "cache")
    # A whole dense model read while quantizing adds at least dense_mib (measured 353-371 MiB when
    # transformers loaded it); tensor by tensor it is the nf4 codes (~1/7 of fp32), the cache
    # being written and a weight or two in flight (measured 140 MiB).
    assert cold < 0.6 * dense_mib, (cold, dense_mib)
    warm = _load_peak_mib(model_dir, tmp_path / "cache")  # codes from the cache: no linear weight read
    assert warm < 0.3 * dense_mib, (warm, dense_mib)


def _mapped_files() -> str:
    return open("/proc/self/maps").read()


def test_map_quantized_reads_the_cache_as_a_memory_map(tmp_path, smollm2_tokenizer, monkeypatch):
    """The first load writes the cache; a mapped load's layers keep views of that file as their
    flat parameter, byte-equal to the copied load's storage, compute the same logits, and the
    mapping goes when the model does."""
    monkeypatch.setenv("QLORAKIT_CACHE", str(tmp_path / "cache"))
    model_dir = save_tiny_llama(tmp_path / "model", smollm2_tokenizer)
    copied = load_model(model_dir, dtype="fp32", quant="nf4", progress=False).model
    (cache_file,) = (tmp_path / "cache" / "quantized").glob("*.safetensors")
    assert str(cache_file) not in _mapped_files()

    mapped = load_model(model_dir, dtype="fp32", quant="nf4", progress=False, map_quantized=True).model
    assert str(cache_file) in _mapped_files()
    layers = {n: m for n, m in mapped.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 14 and all(m.stores_as_parameter for m in layers.values())
    for name, layer in layers.items():
        reference = dict(copied.named_modules())[name]
        for key, tensor in reference.qweight.tensors.items():
            assert torch.equal(layer.qweight.tensors[key], tensor), (name, key)
    ids = torch.randint(0, len(smollm2_tokenizer), (2, 9))
    with torch.no_grad():
        assert torch.equal(mapped(ids).logits, copied(ids).logits)

    del mapped, layers, layer
    gc.collect()
    assert str(cache_file) not in _mapped_files()


def test_map_quantized_writes_a_missing_cache_first(tmp_path, smollm2_tokenizer, monkeypatch):
    monkeypatch.setenv("QLORAKIT_CACHE", str(tmp_path / "cache"))
    model_dir = save_tiny_llama(tmp_path / "model", smollm2_tokenizer)
    mapped = load_model(model_dir, dtype="fp32", quant="int4", group_size=32, progress=False, map_quantized=True).model
    (cache_file,) = (tmp_path / "cache" / "quantized").glob("*.safetensors")
    assert str(cache_file) in _mapped_files()
    copied = load_model(model_dir, dtype="fp32", quant="int4", group_size=32, progress=False).model
    ids = torch.randint(0, len(smollm2_tokenizer), (1, 7))
    with torch.no_grad():
        assert torch.equal(mapped(ids).logits, copied(ids).logits)
