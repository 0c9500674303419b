"""`qlorakit export MODEL --format nf4`: plain transformers + bitsandbytes load the directory.

References: bitsandbytes' own `dequantize_4bit` over the loaded `Params4bit`, transformers'
`from_pretrained` (no qlorakit code on the loading side), and qlorakit's nf4 model of the same source.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qlorakit.cli import main
from tests.conftest import build_tiny, tiny_llama_config


def run(capsys, *argv):
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory, smollm2_tokenizer):
    """A 16-bit HF directory (bf16 safetensors + SmolLM2's tokenizer and chat template)."""
    path = tmp_path_factory.mktemp("dense")
    config = tiny_llama_config(vocab_size=len(smollm2_tokenizer), pad_token_id=smollm2_tokenizer.pad_token_id, initializer_range=0.2)
    build_tiny(config, dtype=torch.bfloat16).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def exported(dense_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "model-nf4"
    assert main(["export", str(dense_dir), "--format", "nf4", "--out", str(out)]) == 0
    return out


def test_nf4_export_loads_in_transformers_with_the_same_weights(dense_dir, exported):
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit
    from transformers import AutoModelForCausalLM

    from qlorakit.quant.nf4 import NF4

    config = json.loads((exported / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["load_in_4bit"] and config["bnb_4bit_quant_type"] == "nf4"
    assert config["bnb_4bit_use_double_quant"] and config["bnb_4bit_compute_dtype"] == "bfloat16"
    for name in ("tokenizer.json", "tokenizer_config.json", "quantization.json"):
        assert (exported / name).is_file(), name
    spec = json.loads((exported / "quantization.json").read_text())
    assert spec["weight_bits"] == 4 and spec["backend"] == "bitsandbytes" and spec["extras"]["quant_type"] == "nf4"

    model = AutoModelForCausalLM.from_pretrained(exported, device_map="cpu")  # plain transformers, no qlorakit
    dense = load_file(str(dense_dir / "model.safetensors"))
    fmt = NF4(64, double_quant=True)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 2 * 7 and "lm_head" not in layers
    for name, layer in layers.items():  # before any forward: bitsandbytes' CPU repack happens there
        state = layer.weight.quant_state
        assert state.quant_type == "nf4" and state.nested and state.blocksize == 64
        loaded = dequantize_4bit(layer.weight.data, state).float()
        expected = fmt.dequantize(fmt.quantize(dense[f"{name}.weight"]), torch.bfloat16).float()  # state.dtype: the compute dtype
        assert torch.equal(loaded, expected), name
    assert torch.equal(model.model.embed_tokens.weight, dense["model.embed_tokens.weight"])
    assert torch.equal(model.lm_head.weight, dense["lm_head.weight"])


def test_nf4_state_dict_round_trips(exported):
    """transformers' state_dict of the loaded model (bitsandbytes' own serialisation) is the file."""
    from transformers import AutoModelForCausalLM

    saved = load_file(str(exported / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(exported, device_map="cpu")
    state = model.state_dict()
    assert set(state) == set(saved)
    for key, tensor in saved.items():
        assert torch.equal(state[key].cpu(), tensor), key


def test_nf4_logits_match_qlorakit_nf4(dense_dir, exported):
    from transformers import AutoModelForCausalLM

    from qlorakit.models.load import load_model

    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    theirs = AutoModelForCausalLM.from_pretrained(exported, device_map="cpu")
    ours = load_model(str(dense_dir), dtype="bf16", quant="nf4", group_size=64, progress=False).model
    with torch.no_grad():
        a, b = theirs(ids).logits.float(), ours(ids).logits.float()
    torch.testing.assert_close(a, b, rtol=0, atol=0.05 * b.abs().max().item())


def test_nf4_export_refuses_an_existing_out_unless_overwrite(dense_dir, tmp_path, capsys):
    out = tmp_path / "model-nf4"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    code, _, err = run(capsys, "export", str(dense_dir), "--format", "nf4", "--out", str(out))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and str(out) in lines[0] and "--overwrite" in lines[0]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-nf4"]  # no staging directory left
    code, _, err = run(capsys, "export", str(dense_dir), "--format", "nf4", "--out", str(out), "--overwrite")
    assert code == 0, err
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-nf4"]


def test_nf4_export_refuses_a_quantized_source_naming_the_key(exported, tmp_path, capsys):
    code, _, err = run(capsys, "export", str(exported), "--format", "nf4", "--out", str(tmp_path / "again"))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and "quantization_config" in lines[0] and "config.json" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_gguf_export_refuses_an_existing_out_before_reading_the_model(dense_dir, tmp_path, capsys):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"someone else's file")
    code, _, err = run(capsys, "export", str(dense_dir), "--format", "gguf", "--out", str(out))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and str(out) in lines[0] and "--overwrite" in lines[0]
    assert out.read_bytes() == b"someone else's file" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_nf4_tensors_equal_bitsandbytes_quantize_4bit(dense_dir, exported):
    """Every stored tensor of every layer equals what bitsandbytes' own quantize_4bit (blocksize 64,
    compress_statistics, nf4) and QuantState.as_dict(packed=True) produce: byte-equal 4-bit codes,
    maps, nested absmax and packed quant_state; the 8-bit absmax codes may differ by one step where
    a value lies on a rounding boundary of the dynamic 8-bit code (qlorakit's nf4 quantizer picks the
    nearest entry in fp32; measured: 1 of the 1,152 absmax codes of this model)."""
    from bitsandbytes.functional import quantize_4bit

    saved = load_file(str(exported / "model.safetensors"))
    dense = load_file(str(dense_dir / "model.safetensors"))
    layers = sorted(k.removesuffix(".weight.absmax") for k in saved if k.endswith(".weight.absmax"))
    assert len(layers) == 14
    differing = total = 0
    for name in layers:
        packed, state = quantize_4bit(dense[f"{name}.weight"], blocksize=64, compress_statistics=True, quant_type="nf4")
        reference = {f"{name}.weight": packed, **{f"{name}.weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
        ours = {k: v for k, v in saved.items() if k == f"{name}.weight" or k.startswith(f"{name}.weight.")}
        assert set(ours) == set(reference), name
        for key, tensor in reference.items():
            if key.endswith(".weight.absmax"):
                step = (ours[key].int() - tensor.int()).abs()
                assert step.max() <= 1, key
                differing += int((step > 0).sum())
                total += step.numel()
            else:
                assert ours[key].dtype == tensor.dtype and torch.equal(ours[key], tensor), key
    assert differing <= 0.01 * total
