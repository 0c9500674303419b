"""GPTQ checkpoints load into int4 bit-exactly; act-order, bits != 4 and missing tensors are refused.

The checkpoint is written here with its own packing code (numpy bit operations, following the
AutoGPTQ layout: qweight (in/8, out) packed along in_features, qzeros (in/G, out/8) packed along
out_features holding z - 1, low nibble first), independent of qlorakit.models.gptq.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qlorakit.models.gptq import GPTQError
from qlorakit.models.load import load_model
from qlorakit.quant.linear import QuantLinear
from tests.conftest import build_tiny, tiny_llama_config, write_jsonl

GROUP = 32
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pack_along_rows(codes: np.ndarray) -> np.ndarray:
    """uint (n, m) codes 0..15 -> int32 (n/8, m): word[j, c] holds rows 8j..8j+7, row 8j+k at bits 4k."""
    n, m = codes.shape
    words = np.zeros((n // 8, m), dtype=np.uint32)
    for k in range(8):
        words |= codes[k::8].astype(np.uint32) << np.uint32(4 * k)
    return words.view(np.int32)


def pack_along_cols(codes: np.ndarray) -> np.ndarray:
    """uint (n, m) codes 0..15 -> int32 (n, m/8), column 8j+k at bits 4k of word j."""
    return pack_along_rows(codes.T).T.copy()


def gptq_rtn(weight: torch.Tensor, rng: np.random.Generator):
    """Any integer codes/zeros with fp16 scales, GPTQ-style: returns the checkpoint tensors and the
    reference w[o, i] = scale[g, o] * (q[i, o] - zero[g, o]) computed in float64."""
    out_features, in_features = weight.shape
    ngroups = in_features // GROUP
    scales = (np.abs(rng.normal(0.02, 0.01, (ngroups, out_features))) + 1e-3).astype(np.float16)  # (ngroups, out)
    zeros = rng.integers(1, 16, (ngroups, out_features))  # real zero 1..15, stored as zero - 1
    q = rng.integers(0, 16, (in_features, out_features))  # (in, out)
    g = np.arange(in_features) // GROUP
    reference = (scales.astype(np.float64)[g] * (q - zeros[g])).T  # (out, in)
    tensors = {
        "qweight": torch.from_numpy(pack_along_rows(q)),
        "qzeros": torch.from_numpy(pack_along_cols(zeros - 1)),
        "scales": torch.from_numpy(scales),
        "g_idx": torch.from_numpy((np.arange(in_features) // GROUP).astype(np.int32)),
    }
    return tensors, reference


def write_gptq_dir(path, model, tokenizer=None, *, quant_config=None, sidecar=False, edit=None, seed=0):
    """Save `model` as a GPTQ checkpoint in `path`; returns {module name: reference fp64 weight}."""
    rng = np.random.default_rng(seed)
    state, references = {}, {}
    for name, tensor in model.state_dict().items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.rsplit(".", 1)[-1] in PROJECTIONS:
            tensors, references[module] = gptq_rtn(tensor, rng)
            state.update({f"{module}.{k}": v for k, v in tensors.items()})
        else:
            state[name] = tensor.contiguous()
    if edit:
        edit(state)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(path)
    qc = {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": False, **(quant_config or {})}
    config = json.loads((path / "config.json").read_text())
    if sidecar:
        (path / "quantize_config.json").write_text(json.dumps({k: v for k, v in qc.items() if k != "quant_method"}))
    else:
        config["quantization_config"] = qc
    (path / "config.json").write_text(json.dumps(config))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return references


@pytest.fixture
def tiny(smollm2_tokenizer):
    return build_tiny(tiny_llama_config(vocab_size=len(smollm2_tokenizer), pad_token_id=smollm2_tokenizer.pad_token_id))


@pytest.mark.parametrize("sidecar", [False, True], ids=["config.json", "quantize_config.json"])
def test_gptq_loads_into_int4_bit_exactly(tmp_path, tiny, smollm2_tokenizer, sidecar):
    references = write_gptq_dir(tmp_path, tiny, smollm2_tokenizer, sidecar=sidecar)
    model = load_model(str(tmp_path), dtype="fp32", quant="int4", progress=False).model
    for module, reference in references.items():
        layer = model.get_submodule(module)
        assert isinstance(layer, QuantLinear) and layer.fmt.name == "int4" and layer.group_size == GROUP
        dense = layer.fmt.dequantize(layer.qweight, torch.float32)
        expected = torch.from_numpy(reference).float()  # exact in fp32: 11 + 5 significant bits
        assert torch.equal(dense, expected), module
    # the parts GPTQ leaves dense load as they are
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(model.get_parameter(name), tiny.get_parameter(name)), name


def test_gptq_dense_load_and_forward_match_the_reference(tmp_path, tiny, smollm2_tokenizer):
    references = write_gptq_dir(tmp_path, tiny, smollm2_tokenizer)
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
        ({"desc_act": True}, None, "quantization_config.desc_act"),
        ({"bits": 8}, None, "quantization_config.bits"),
        (None, lambda s: s.__setitem__("model.layers.0.self_attn.q_proj.g_idx", torch.from_numpy(np.random.default_rng(0).permutation(64).astype(np.int32) // GROUP)),
         "model.layers.0.self_attn.q_proj.g_idx"),
        (None, lambda s: s.pop("model.layers.1.mlp.up_proj.qzeros"), "model.layers.1.mlp.up_proj.qzeros"),
    ],
    ids=["desc_act", "bits8", "act-order-g_idx", "missing-qzeros"],
)
def test_unsupported_gptq_is_refused_naming_the_key(tmp_path, tiny, smollm2_tokenizer, quant_config, edit, message):
    write_gptq_dir(tmp_path, tiny, smollm2_tokenizer, quant_config=quant_config, edit=edit)
    with pytest.raises(GPTQError, match=message) as info:
        load_model(str(tmp_path), dtype="fp32", quant="int4", progress=False)
    assert "\n" not in str(info.value)


def test_qalora_trains_and_merges_exactly_on_gptq(tmp_path, tiny, smollm2_tokenizer):
    from qlorakit.config import config_from_dict
    from qlorakit.models.quantized_dir import load_quantized_dir
    from qlorakit.merge.run import merge_run
    from qlorakit.train.loop import train

    base = tmp_path / "gptq"
    base.mkdir()
    write_gptq_dir(base, tiny, smollm2_tokenizer)
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
    result = train(cfg, progress=False)
    assert result.final_loss == result.final_loss  # finite
    merged = merge_run(tmp_path / "run", tmp_path / "merged", progress=False)
    assert merged.report["into"] == "zero_points"
    base_model = load_model(str(base), dtype="fp32", quant="int4", progress=False).model
    merged_model = load_quantized_dir(tmp_path / "merged")
    layer = "model.layers.0.self_attn.q_proj"
    before, after = base_model.get_submodule(layer).qweight, merged_model.get_submodule(layer).qweight
    assert torch.equal(before.tensors["codes"], after.tensors["codes"])
    assert torch.equal(before.tensors["scales"], after.tensors["scales"])
    assert not torch.equal(before.tensors["mins"], after.tensors["mins"])


def test_group_size_must_match_the_checkpoint(tmp_path, tiny, smollm2_tokenizer):
    write_gptq_dir(tmp_path, tiny, smollm2_tokenizer)
    with pytest.raises(GPTQError, match=r"quant.group_size: 64, .* has group_size 32; set quant.group_size=32"):
        load_model(str(tmp_path), dtype="fp32", quant="int4", group_size=64, progress=False)
    with pytest.raises(ValueError, match="GPTQ checkpoint loads with quant.method int4"):
        load_model(str(tmp_path), dtype="fp32", quant="nf4", progress=False)
