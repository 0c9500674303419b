"""AWQ GEMM checkpoints load into int4 bit-exactly, train QA-LoRA and merge exactly into their zeros;
other AWQ versions, bits != 4, no zero points and missing tensors are refused naming the key.

The checkpoint is packed here with its own code (numpy bit operations, following AutoAWQ's GEMM
layout: qweight (in, out/8) and qzeros (in/G, out/8) packed along out_features, column 8j + o of
word j at nibble k where o = (0, 2, 4, 6, 1, 3, 5, 7)[k]; fp16 scales (in/G, out); zeros stored
as they are), independent of qlorakit.models.awq.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qlorakit.models.awq import AWQError
from qlorakit.models.load import load_model
from qlorakit.quant.linear import QuantLinear
from tests.conftest import build_tiny, tiny_llama_config, write_jsonl

GROUP = 32
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INTERLEAVE = (0, 2, 4, 6, 1, 3, 5, 7)


def awq_pack(codes: np.ndarray) -> np.ndarray:
    """uint (n, m) codes 0..15 -> int32 (n, m/8) in AWQ's GEMM order."""
    n, m = codes.shape
    words = np.zeros((n, m // 8), dtype=np.uint32)
    for k, column in enumerate(INTERLEAVE):
        words |= codes[:, column::8].astype(np.uint32) << np.uint32(4 * k)
    return words.view(np.int32)


def awq_layer(out_features: int, in_features: int, rng: np.random.Generator):
    """Random codes/zeros with fp16 scales; returns the checkpoint tensors and the reference
    w[o, i] = scale[g, o] * (q[i, o] - zero[g, o]) in float64."""
    ngroups = in_features // GROUP
    scales = (np.abs(rng.normal(0.02, 0.01, (ngroups, out_features))) + 1e-3).astype(np.float16)
    zeros = rng.integers(0, 16, (ngroups, out_features))
    q = rng.integers(0, 16, (in_features, out_features))  # (in, out)
    g = np.arange(in_features) // GROUP
    reference = (scales.astype(np.float64)[g] * (q - zeros[g])).T  # (out, in)
    tensors = {"qweight": torch.from_numpy(awq_pack(q)), "qzeros": torch.from_numpy(awq_pack(zeros)),
               "scales": torch.from_numpy(scales)}
    return tensors, reference


def write_awq_dir(path, model, tokenizer=None, *, quant_config=None, edit=None, seed=0):
    """Save `model` as an AWQ GEMM checkpoint in `path`; returns {module name: reference fp64 weight}."""
    rng = np.random.default_rng(seed)
    state, references = {}, {}
    for name, tensor in model.state_dict().items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.rsplit(".", 1)[-1] in PROJECTIONS:
            tensors, references[module] = awq_layer(*tensor.shape, rng)
            state.update({f"{module}.{k}": v for k, v in tensors.items()})
        else:
            state[name] = tensor.contiguous()
    if edit:
        edit(state)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True,
                                     "version": "gemm", **(quant_config or {})}
    (path / "config.json").write_text(json.dumps(config))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return references


@pytest.fixture
def tiny(smollm2_tokenizer):
    return build_tiny(tiny_llama_config(vocab_size=len(smollm2_tokenizer), pad_token_id=smollm2_tokenizer.pad_token_id))


def test_the_test_packer_puts_each_code_where_awq_says():
    codes = np.arange(16, dtype=np.uint32).reshape(1, 16) % 16  # columns 0..15 hold codes 0..15
    words = awq_pack(codes).view(np.uint32)
    assert words.shape == (1, 2)
    assert [(int(words[0, 0]) >> (4 * k)) & 15 for k in range(8)] == list(INTERLEAVE)  # nibble k holds column o(k)


def test_awq_loads_into_int4_bit_exactly(tmp_path, tiny, smollm2_tokenizer):
    references = write_awq_dir(tmp_path, tiny, smollm2_tokenizer)
    model = load_model(str(tmp_path), dtype="fp32", quant="int4", progress=False).model
    for module, reference in references.items():
        layer = model.get_submodule(module)
        assert isinstance(layer, QuantLinear) and layer.fmt.name == "int4" and layer.group_size == GROUP
        dense = layer.fmt.dequantize(layer.qweight, torch.float32)
        assert torch.equal(dense, torch.from_numpy(reference).float()), module  # exact: 11 + 5 significant bits
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(model.get_parameter(name), tiny.get_parameter(name)), name


def test_awq_dense_load_and_forward_match_the_reference(tmp_path, tiny, smollm2_tokenizer):
    references = write_awq_dir(tmp_path, tiny, smollm2_tokenizer)
    quantized = load_model(str(tmp_path), dtype="fp32", quant="int4", progress=False).model
    dense = load_model(str(tmp_path), dtype="fp32", quant="none", progress=False).model
    with torch.no_grad():
        for module, reference in references.items():
            tiny.get_submodule(module).weight.copy_(torch.from_numpy(reference).float())
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tiny(ids).logits
        torch.testing.assert_close(dense(ids).logits, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(quantized(ids).logits, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "quant_config, edit, message",
    [
        ({"version": "gemv"}, None, "quantization_config.version is 'gemv'"),
        ({"version": "exllama"}, None, "quantization_config.version is 'exllama'"),
        ({"bits": 8}, None, "quantization_config.bits"),
        ({"zero_point": False}, None, "quantization_config.zero_point"),
        (None, lambda s: s.pop("model.layers.1.mlp.up_proj.qzeros"), "model.layers.1.mlp.up_proj.qzeros"),
    ],
    ids=["gemv", "exllama", "bits8", "no-zero-point", "missing-qzeros"],
)
def test_unsupported_awq_is_refused_naming_the_key(tmp_path, tiny, smollm2_tokenizer, quant_config, edit, message):
    write_awq_dir(tmp_path, tiny, smollm2_tokenizer, quant_config=quant_config, edit=edit)
    with pytest.raises(AWQError, match=message) as info:
        load_model(str(tmp_path), dtype="fp32", quant="int4", progress=False)
    assert "\n" not in str(info.value)


def test_qalora_trains_and_merges_exactly_on_awq(tmp_path, tiny, smollm2_tokenizer):
    """QA-LoRA on the AWQ checkpoint: the merge changes only the int4 mins (the zeros), codes and
    scales stay byte for byte, and the merged int4 model computes what the adapter model computed."""
    from qlorakit.config import config_from_dict
    from qlorakit.merge.run import merge_run
    from qlorakit.models.quantized_dir import load_quantized_dir
    from qlorakit.models.restore import load_run
    from qlorakit.train.loop import train

    base = tmp_path / "awq"
    base.mkdir()
    write_awq_dir(base, tiny, smollm2_tokenizer)
    rows = [{"instruction": f"What colour is item {i}?", "input": "", "output": f"Item {i} is red."} for i in range(8)]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    cfg = config_from_dict({
        "model": {"name": str(base), "dtype": "fp32"},
        "quant": {"method": "int4", "group_size": GROUP},
        "adapter": {"kind": "qalora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"path": str(data), "max_length": 48},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "batch_size": 4, "lr": 1e-2,
                  "warmup_ratio": 0.0, "save_every": None},
    })
    train(cfg, progress=False)
    merged = merge_run(tmp_path / "run", tmp_path / "merged", progress=False)
    assert merged.report["into"] == "zero_points" and merged.report["faithful"]
    base_model = load_model(str(base), dtype="fp32", quant="int4", progress=False).model
    merged_model = load_quantized_dir(tmp_path / "merged")
    for layer in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        before, after = base_model.get_submodule(layer).qweight, merged_model.get_submodule(layer).qweight
        assert torch.equal(before.tensors["codes"], after.tensors["codes"])
        assert torch.equal(before.tensors["scales"], after.tensors["scales"])
        assert not torch.equal(before.tensors["mins"], after.tensors["mins"])
    adapter_model, _ = load_run(tmp_path / "run", progress=False)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(merged_model(ids).logits, adapter_model.model(ids).logits, rtol=0, atol=1e-3)
