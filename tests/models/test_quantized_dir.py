"""The int4 directory of an exact QA-LoRA merge (models/quantized_dir.py): written and read back
bit for bit, for untied and tied heads and GPT-2's Conv1D layers, on tiny models."""

from __future__ import annotations

import pytest
import torch

from qlorakit.models.quantized_dir import QuantizedDirError, load_quantized_dir, save_quantized_dir
from qlorakit.merge.zero_point import merged_qalora_model
from qlorakit.quant.linear import QuantLinear
from tests.merge.conftest import CONFIGS, adapter_model, logits, random_ids, tiny_tokenizer  # noqa: F401 (fixtures)

SPEC = {"method": "QALORA", "weight_bits": 4, "group_size": 64, "backend": "torch",
        "extras": {"quant_type": "int4", "compute_dtype": "fp32"}}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_int4_directory_round_trip(name, tiny_tokenizer, random_ids, tmp_path):  # noqa: F811
    merged = merged_qalora_model(adapter_model(CONFIGS[name](), "int4", kind="qalora", group_size=64))
    out = save_quantized_dir(merged, tiny_tokenizer, tmp_path / "m", extra_files={"quantization.json": SPEC})
    model = load_quantized_dir(out)
    old = {n: m for n, m in merged.named_modules() if isinstance(m, QuantLinear)}
    new = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert old.keys() == new.keys() and len(new) > 0
    for n, layer in new.items():
        assert layer.source_layout == old[n].source_layout and layer.group_size == 64
        for key, tensor in old[n].qweight.tensors.items():
            assert torch.equal(layer.qweight.tensors[key], tensor), f"{n}.qweight_{key}"
    if merged.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert torch.equal(logits(model, random_ids), logits(merged, random_ids))


def test_missing_tensors_are_named(tiny_tokenizer, tmp_path):  # noqa: F811
    from safetensors.torch import load_file, save_file

    merged = merged_qalora_model(adapter_model(CONFIGS["llama"](), "int4", kind="qalora", group_size=64))
    out = save_quantized_dir(merged, tiny_tokenizer, tmp_path / "m", extra_files={"quantization.json": SPEC})
    state = load_file(out / "model-int4.safetensors")
    del state["model.norm.weight"]
    save_file(state, out / "model-int4.safetensors")
    with pytest.raises(QuantizedDirError, match="tensors missing model.norm.weight"):
        load_quantized_dir(out)
