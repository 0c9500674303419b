"""GGUF export: the QA-LoRA fold written into SmolLM2's own GGUF, and merged 16-bit models as GGUF.

The references are gguf-py (reader, `gguf.quants`) and transformers' own GGUF loader, which
un-permutes attn_q/attn_k on reading: its logits agreeing with qlorakit's checks the row order end
to end. SmolLM2 is loaded once for the module (~15-30 s); the whole module takes a few minutes.
"""

from __future__ import annotations

import filecmp
import json

import numpy as np
import pytest
import torch

from qlorakit.adapters.inject import add_adapters, adapter_layers
from qlorakit.export.gguf import export_dense_to_gguf
from qlorakit.models.gguf_write import GGUFExportError, gguf_tensor_names, write_merged_gguf
from qlorakit.merge.zero_point import fold_qalora_into_base, merged_qalora_model
from qlorakit.models.gguf_io import permute_qk_rows
from qlorakit.models.load import load_config
from qlorakit.quant.base import QuantizationError
from qlorakit.quant.registry import get_format
from tests.conftest import build_tiny, tiny_gpt2_config, tiny_llama_config

PROMPT = "The capital of France is Paris. The capital of Italy is"


def reader(path):
    from gguf import GGUFReader

    return GGUFReader(str(path))


def fields_of(r) -> dict:
    """Every key-value field: name -> (types, contents)."""
    return {name: ([t.name for t in f.types], f.contents()) for name, f in r.fields.items()}


def forward(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture(scope="module")
def adapted():
    """SmolLM2 over its own Q4_1 blocks, all-linear QA-LoRA (G = 32) with random B; and its input ids."""
    from qlorakit.models.load import load_model

    loaded = load_model("smollm2", dtype="fp32", quant="gguf", progress=False)
    add_adapters(loaded.model, "all-linear", r=8, alpha=16, kind="qalora", group_size=32)
    torch.manual_seed(0)
    for layer in adapter_layers(loaded.model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    return loaded, ids


@pytest.fixture(scope="module")
def folded(adapted):
    return fold_qalora_into_base(adapted[0].model)


@pytest.fixture(scope="module")
def merged_gguf(adapted, folded, smollm2_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("merged") / "merged.gguf"
    return write_merged_gguf(smollm2_path, folded, adapted[0].model.config, path)


@pytest.mark.slow
@pytest.mark.smollm2
def test_unmodified_rewrite_is_byte_identical(adapted, smollm2_path, tmp_path):
    out = write_merged_gguf(smollm2_path, {}, adapted[0].model.config, tmp_path / "copy.gguf")
    assert filecmp.cmp(smollm2_path, out, shallow=False)
    assert [p.name for p in tmp_path.iterdir()] == ["copy.gguf"]  # no temporary file left behind


@pytest.mark.slow
@pytest.mark.smollm2
def test_fold_is_exact_up_to_fp16_mins(adapted, folded):
    model = adapted[0].model
    assert len(folded) == 210 and {q.format for q in folded.values()} == {"q4_1"}
    q4_1 = get_format("q4_1")
    for name, q in folded.items():
        layer = model.get_submodule(name)
        expected = layer.base_layer.dequantize_weight(torch.float32) + layer.delta_weight()  # (out, in)
        mins = q.tensors["blocks"].view(q.out_features, -1, 20)[..., 2:4].contiguous().view(torch.float16).float()
        bound = (mins.abs() * 2.0**-11 + 1e-6).squeeze(-1).repeat_interleave(32, dim=1)  # (out, in)
        assert ((q4_1.dequantize(q) - expected).abs() <= bound).all(), name


@pytest.mark.slow
@pytest.mark.smollm2
def test_merged_gguf_changes_only_the_mins(merged_gguf, folded, smollm2_path):
    source, merged = reader(smollm2_path), reader(merged_gguf)
    assert merged_gguf.stat().st_size == smollm2_path.stat().st_size
    assert fields_of(merged) == fields_of(source)  # tokenizer, chat template, hyperparameters
    assert [(t.name, t.tensor_type) for t in merged.tensors] == [(t.name, t.tensor_type) for t in source.tensors]
    names = gguf_tensor_names(load_config(str(smollm2_path)))  # GGUF name -> transformers name
    folded_names = {g for g, hf in names.items() if hf.removesuffix(".weight") in folded}
    assert len(folded_names) == 210
    for old, new in zip(source.tensors, merged.tensors):
        if old.name not in folded_names:
            assert np.array_equal(old.data, new.data), old.name
            continue
        a = np.asarray(old.data).reshape(old.data.shape[0], -1, 20)  # (out, nblocks, 20) Q4_1 blocks
        b = np.asarray(new.data).reshape(new.data.shape[0], -1, 20)
        assert np.array_equal(a[..., 0:2], b[..., 0:2]), old.name  # d
        assert np.array_equal(a[..., 4:20], b[..., 4:20]), old.name  # 4-bit codes
        assert (a[..., 2:4] != b[..., 2:4]).any(-1).mean() > 0.9, old.name  # m changed (nearly) everywhere


@pytest.mark.slow
@pytest.mark.smollm2
def test_transformers_reads_the_merged_gguf_as_the_adapter_model(adapted, merged_gguf):
    from transformers import AutoModelForCausalLM

    (loaded, ids) = adapted
    model = loaded.model
    reference = forward(model, ids)
    folded_model = forward(merged_qalora_model(model), ids)
    hf = AutoModelForCausalLM.from_pretrained(merged_gguf.parent, gguf_file=merged_gguf.name, dtype=torch.float32)
    from_file = forward(hf, ids)
    for layer in adapter_layers(model).values():
        layer.disabled = True
    base = forward(model, ids)
    for layer in adapter_layers(model).values():
        layer.disabled = False
    # measured: file vs qlorakit's merged model 0.0; vs the adapter model 0.076 (fp16 mins), with
    # logits up to 28 and an adapter effect of 10.6.
    assert (from_file - folded_model).abs().max() < 1e-3
    diff, effect = (from_file - reference).abs().max(), (base - reference).abs().max()
    assert effect > 1.0 and diff < 0.02 * effect and diff < 0.01 * reference.abs().max()


@pytest.mark.slow
@pytest.mark.smollm2
def test_write_refuses_unknown_names_and_non_gguf_formats(adapted, folded, smollm2_path, tmp_path):
    config = adapted[0].model.config
    q = next(iter(folded.values()))
    with pytest.raises(GGUFExportError, match="no tensor for model.layers.0.nonexistent"):
        write_merged_gguf(smollm2_path, {"model.layers.0.nonexistent": q}, config, tmp_path / "x.gguf")
    name = "model.layers.0.mlp.down_proj"  # (576, 1536)
    int4 = get_format("int4", group_size=32).quantize(torch.randn(576, 1536))
    with pytest.raises(QuantizationError, match="int4"):
        write_merged_gguf(smollm2_path, {name: int4}, config, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.smollm2
def test_write_changes_a_tensor_type(adapted, smollm2_path, tmp_path):
    """A q4_0 base folds into q4_1 (merge/zero_point.py); the writer takes any GGUF block format."""
    import gguf

    torch.manual_seed(0)
    q = get_format("q5_1").quantize(torch.randn(192, 576))  # attn_k: (kv_heads * head_dim, hidden)
    out = write_merged_gguf(smollm2_path, {"model.layers.3.self_attn.k_proj": q}, adapted[0].model.config, tmp_path / "m.gguf")
    tensor = {t.name: t for t in reader(out).tensors}["blk.3.attn_k.weight"]
    assert tensor.tensor_type == gguf.GGMLQuantizationType.Q5_1 and [int(n) for n in tensor.shape] == [576, 192]
    expected = permute_qk_rows(q.tensors["blocks"], 3).numpy()  # (192, 18 * 24), GGUF row order
    assert np.array_equal(np.asarray(tensor.data), expected)
    assert out.stat().st_size == smollm2_path.stat().st_size + 192 * 18 * (24 - 20)


@pytest.fixture(scope="module")
def merged_dir(adapted, smollm2_path, tmp_path_factory):
    """The adapter model merged to fp16 and saved as a plain HF directory naming its source GGUF."""
    from qlorakit.merge.fold import merge_to_dense
    from qlorakit.merge.write import save_merged

    loaded, _ = adapted
    dense = merge_to_dense(loaded.model, torch.float16)
    spec = {"method": "QALORA", "weight_bits": 16, "extras": {"source_model": str(smollm2_path)}}
    out = tmp_path_factory.mktemp("dense") / "merged"
    return save_merged(dense, loaded.tokenizer, out, extra_files={"quantization.json": spec})


@pytest.mark.slow
@pytest.mark.smollm2
def test_dense_f16_export_matches_the_hf_directory(adapted, merged_dir, smollm2_path, tmp_path):
    from gguf import GGMLQuantizationType as T
    from transformers import AutoModelForCausalLM

    out = export_dense_to_gguf(merged_dir, tmp_path / "model-f16.gguf", "f16")
    source, written = reader(smollm2_path), reader(out)
    fields = fields_of(written)
    assert fields.pop("general.file_type")[1] == 1  # MOSTLY_F16
    expected = fields_of(source)
    expected.pop("general.file_type")
    assert fields == expected
    assert [t.name for t in written.tensors] == [t.name for t in source.tensors]
    assert {t.tensor_type for t in written.tensors if len(t.shape) == 1} == {T.F32}
    assert {t.tensor_type for t in written.tensors if len(t.shape) == 2} == {T.F16}

    ids = adapted[1]
    hf_dir = forward(AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32), ids)
    gguf = forward(AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32), ids)
    assert (gguf - hf_dir).abs().max() < 1e-3  # fp16 weights stored exactly; measured 0.0


@pytest.mark.slow
@pytest.mark.smollm2
def test_dense_q4_1_export_matches_gguf_py(merged_dir, smollm2_path, tmp_path):
    import gguf
    from safetensors.torch import load_file

    out = export_dense_to_gguf(merged_dir, tmp_path / "model-q4_1.gguf", "q4_1")
    assert out.stat().st_size == smollm2_path.stat().st_size  # same layout as the source Q4_1 file
    tensors = {t.name: t for t in reader(out).tensors}
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_1
    weights = load_file(merged_dir / "model.safetensors")
    q = weights["model.layers.0.self_attn.q_proj.weight"].float()  # (576, 576), transformers row order
    expected = gguf.quants.quantize(permute_qk_rows(q, 9).numpy(), gguf.GGMLQuantizationType.Q4_1)
    assert np.array_equal(np.asarray(tensors["blk.0.attn_q.weight"].data), expected)


def test_export_needs_a_source_gguf(tmp_path):
    build_tiny(tiny_llama_config()).save_pretrained(tmp_path)
    with pytest.raises(GGUFExportError, match="quantization.json names none.*convert_hf_to_gguf"):
        export_dense_to_gguf(tmp_path, tmp_path / "x.gguf")
    (tmp_path / "quantization.json").write_text(json.dumps({"extras": {"source_model": "smollm2"}}))
    with pytest.raises(GGUFExportError, match="extras.source_model = 'smollm2'"):
        export_dense_to_gguf(tmp_path, tmp_path / "x.gguf")


def test_export_refuses_other_architectures_and_types(tmp_path):
    build_tiny(tiny_gpt2_config()).save_pretrained(tmp_path)
    with pytest.raises(GGUFExportError, match="supports llama, not 'gpt2'"):
        export_dense_to_gguf(tmp_path, tmp_path / "x.gguf")
    with pytest.raises(GGUFExportError, match="--type: unknown GGUF type 'q2_k'"):
        export_dense_to_gguf(tmp_path, tmp_path / "x.gguf", "q2_k")


@pytest.mark.slow
@pytest.mark.smollm2
def test_export_refuses_a_source_gguf_of_another_model(smollm2_path, tmp_path):
    build_tiny(tiny_llama_config()).save_pretrained(tmp_path)
    with pytest.raises(GGUFExportError, match="llama.block_count is 30, the model to export has 2"):
        export_dense_to_gguf(tmp_path, tmp_path / "x.gguf", source_gguf=smollm2_path)


@pytest.mark.slow
def test_cli_export_refuses_an_existing_gguf_unless_overwrite(merged_dir, tmp_path, capsys):
    """An existing output is refused with one line naming it; --overwrite replaces it atomically."""
    from qlorakit.cli import main

    out = tmp_path / "model.gguf"
    out.write_bytes(b"someone else's file")
    capsys.readouterr()
    assert main(["export", str(merged_dir), "--format", "gguf", "--out", str(out), "--type", "q8_0"]) != 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and str(out) in lines[0] and "--overwrite" in lines[0]
    assert out.read_bytes() == b"someone else's file" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
    assert main(["export", str(merged_dir), "--format", "gguf", "--out", str(out), "--type", "q8_0", "--overwrite"]) == 0
    assert reader(out).tensors and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


@pytest.mark.slow
@pytest.mark.smollm2
@pytest.mark.parametrize("head_dtype", ["fp32", "bf16"])
def test_dense_export_keeps_the_head_dtype_the_merge_chose(adapted, smollm2_path, tmp_path, head_dtype):
    """An fp16 merge with the (tied) head in fp32 or bf16: token_embd keeps that float type in
    every export type, value for value; the other 2-D tensors take the type asked for."""
    from gguf import GGMLQuantizationType as T
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from qlorakit.dtypes import to_torch_dtype
    from qlorakit.merge.fold import merge_to_dense
    from qlorakit.merge.write import save_merged

    loaded, ids = adapted
    dense = merge_to_dense(loaded.model, torch.float16, lm_head_dtype=to_torch_dtype(head_dtype))
    spec = {"method": "QALORA", "weight_bits": 16,
            "extras": {"source_model": str(smollm2_path), "merged_dtype": "fp16", "lm_head_dtype": head_dtype}}
    merged = save_merged(dense, loaded.tokenizer, tmp_path / "merged", extra_files={"quantization.json": spec})
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        stored = f.get_tensor("model.embed_tokens.weight")
    kind = {"fp32": T.F32, "bf16": T.BF16}[head_dtype]
    for type, others in (("f16", T.F16), ("q8_0", T.Q8_0)):
        out = export_dense_to_gguf(merged, tmp_path / f"model-{type}.gguf", type)
        tensors = {t.name: t for t in reader(out).tensors}
        assert tensors["token_embd.weight"].tensor_type == kind
        assert {t.tensor_type for n, t in tensors.items() if len(t.shape) == 2 and n != "token_embd.weight"} == {others}
    raw = np.asarray(tensors["token_embd.weight"].data)
    values = torch.from_numpy(raw.copy()).view(torch.bfloat16) if head_dtype == "bf16" else torch.from_numpy(raw.copy())
    assert torch.equal(values.reshape(stored.shape), stored)
    hf_dir = forward(AutoModelForCausalLM.from_pretrained(merged), ids)  # config.json: fp32, every value unchanged
    f16 = tmp_path / "model-f16.gguf"
    gguf = forward(AutoModelForCausalLM.from_pretrained(f16.parent, gguf_file=f16.name, dtype=torch.float32), ids)
    assert (gguf - hf_dir).abs().max() < 1e-3
