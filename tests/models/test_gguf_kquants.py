"""A GGUF that mixes K-quants with legacy blocks, as Q4_K_M files do, loads over its own bytes.

The file is SmolLM2's own GGUF with ffn_down of layers 0-4 rewritten as q2_k, q3_k, q4_k, q5_k and
q6_k (their rows, 1536 values, are whole super-blocks; the other tensors stay q4_1). References:
gguf-py's reader and dequantizer, and transformers' own GGUF loader for the logits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qlorakit.adapters.inject import add_adapters, adapter_layers
from qlorakit.inspect import inspect_model
from qlorakit.models.gguf_write import PlannedTensor, copied_tensor, write_gguf, write_merged_gguf
from qlorakit.models.load import load_config, load_model
from qlorakit.models.sources import ModelSourceError
from qlorakit.quant.linear import QuantLinear
from qlorakit.quant.registry import get_format

K_LAYERS = {0: "q2_k", 1: "q3_k", 2: "q4_k", 3: "q5_k", 4: "q6_k"}
PROMPT = "The capital of France is Paris. The capital of Italy is"

pytestmark = [pytest.mark.smollm2, pytest.mark.slow]


@pytest.fixture(scope="module")
def reader():
    """gguf-py's reader of a path, parsed once per file for the module (SmolLM2's 49,152-token
    vocabulary takes gguf-py tens of seconds to parse on 2 cores)."""
    from gguf import GGUFReader

    cache = {}

    def read(path):
        if str(path) not in cache:
            cache[str(path)] = GGUFReader(str(path))
        return cache[str(path)]

    return read


def _dense(tensor) -> torch.Tensor:
    from gguf import dequantize

    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # (out, in)
    return torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).reshape(shape).copy())


@pytest.fixture(scope="module")
def kquant_gguf(smollm2_path, tmp_path_factory, reader):
    tensors = {t.name: t for t in reader(smollm2_path).tensors}
    new = {}
    for layer, name in K_LAYERS.items():
        dense = _dense(tensors[f"blk.{layer}.ffn_down.weight"])  # (576, 1536)
        new[f"model.layers.{layer}.mlp.down_proj"] = get_format(name).quantize(dense)
    path = tmp_path_factory.mktemp("kquant") / "smollm2-kquant-mix.gguf"
    return write_merged_gguf(smollm2_path, new, load_config(str(smollm2_path)), path)


@pytest.fixture(scope="module")
def loaded(kquant_gguf):
    return load_model(str(kquant_gguf), dtype="fp32", quant="gguf", progress=False)


def test_every_linear_layer_keeps_the_files_own_bytes(loaded, kquant_gguf, reader):
    tensors = {t.name: t for t in reader(kquant_gguf).tensors}
    model = loaded.model
    dense_linear = [name for name, m in model.named_modules() if type(m) is torch.nn.Linear and name != "lm_head"]
    assert dense_linear == []
    for layer, name in K_LAYERS.items():
        module = model.get_submodule(f"model.layers.{layer}.mlp.down_proj")
        assert isinstance(module, QuantLinear) and module.qweight.format == name
        stored = tensors[f"blk.{layer}.ffn_down.weight"]
        assert np.array_equal(module.qweight.tensors["blocks"].numpy(), np.asarray(stored.data))
        assert torch.equal(module.dequantize_weight(torch.float32), _dense(stored))
    assert model.get_submodule("model.layers.5.mlp.down_proj").qweight.format == "q4_1"


def test_logits_equal_transformers_gguf_loader(loaded, kquant_gguf):
    from transformers import AutoModelForCausalLM

    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    hf = AutoModelForCausalLM.from_pretrained(kquant_gguf.parent, gguf_file=kquant_gguf.name, dtype=torch.float32)
    with torch.no_grad():
        ours, reference = loaded.model(ids).logits, hf(ids).logits
    torch.testing.assert_close(ours, reference, atol=2e-4, rtol=1e-4)


def test_lora_trains_on_the_k_quant_layers(kquant_gguf):
    fresh = load_model(str(kquant_gguf), dtype="fp32", quant="gguf", progress=False)
    model = fresh.model
    add_adapters(model, ["down_proj"], r=4, alpha=8)
    torch.manual_seed(0)
    for layer in adapter_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.01)
    ids = fresh.tokenizer(PROMPT, return_tensors="pt").input_ids
    model(ids, labels=ids).loss.backward()
    layers = adapter_layers(model)
    for layer in K_LAYERS:
        grad = layers[f"model.layers.{layer}.mlp.down_proj"].lora_A.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_inspect_counts_each_format_of_the_file(kquant_gguf):
    report = inspect_model(str(kquant_gguf), lora_r=0)
    assert report.quant == "gguf"
    by_type = {t["type"]: t for t in report.file_types}
    for name in K_LAYERS.values():
        fmt = get_format(name)
        assert by_type[name]["tensors"] == 1 and by_type[name]["parameters"] == 576 * 1536
        assert by_type[name]["bytes"] == sum(fmt.storage_bytes(576, 1536))
    assert by_type["q4_1"]["tensors"] == 210 - len(K_LAYERS)
    rows = {(g.name, g.dtype): g.count for g in report.modules}
    assert rows[("down_proj", "q4_1")] == 25 and rows[("down_proj", "q6_k")] == 1
    assert report.quantized_parameters == 106_168_320  # every linear weight, none counted dense


def test_a_type_that_cannot_be_kept_is_refused_naming_the_tensor(smollm2_path, tmp_path, reader):
    """An IQ2_XXS ffn_down (a block type qlorakit does not keep) is an error, not a dense copy."""
    from gguf import GGMLQuantizationType

    source = reader(smollm2_path)
    rng = np.random.default_rng(0)
    planned = []
    for tensor in source.tensors:
        if tensor.name != "blk.3.ffn_down.weight":
            planned.append(copied_tensor(tensor))
            continue
        blocks = rng.integers(0, 256, size=(576, 1536 // 256, 66), dtype=np.uint8)
        blocks[..., 0:2] = np.full((576, 6, 1), 0.01, dtype=np.float16).view(np.uint8)  # finite d
        data = blocks.reshape(576, -1)
        planned.append(PlannedTensor(tensor.name, data.shape, data.dtype, data.nbytes, GGMLQuantizationType.IQ2_XXS, lambda d=data: d))
    path = write_gguf(source, tmp_path / "iq2.gguf", planned)
    with pytest.raises(ModelSourceError, match=r"tensor blk\.3\.ffn_down\.weight is IQ2_XXS, a type quant.method gguf cannot keep"):
        load_model(str(path), dtype="fp32", quant="gguf", progress=False)
    dense = load_model(str(path), dtype="fp32", quant="none", progress=False)  # asked for: a dense model
    assert type(dense.model.get_submodule("model.layers.3.mlp.down_proj")) is torch.nn.Linear
