"""save_merged: a directory vanilla transformers loads, written all or nothing."""

import json
from collections import namedtuple

import pytest
import torch
from safetensors import safe_open

from qlorakit.merge import write
from qlorakit.merge.fold import merge_to_dense
from qlorakit.merge.write import MergeWriteError, save_merged
from qlorakit.models.precision import computing_in
from tests.conftest import build_tiny
from tests.merge.conftest import CONFIGS, adapter_model, logits


def _load_plain(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _stored_dtypes(path):
    dtypes = {}
    for shard in path.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            dtypes.update({key: f.get_slice(key).get_dtype() for key in f.keys()})
    return dtypes


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_merge_reloads_with_plain_transformers(arch, dtype, tmp_path, tiny_tokenizer, random_ids):
    config = CONFIGS[arch]()
    merged = merge_to_dense(adapter_model(config), dtype)
    extra = {"quantization.json": {"method": "QLORA", "weight_bits": 16}, "merge_report.json": {"greedy_token_agreement": 1.0}}
    out = save_merged(merged, tiny_tokenizer, tmp_path / "merged", max_shard_size="100KB", extra_files=extra)
    reloaded, tokenizer = _load_plain(out)
    assert torch.equal(logits(reloaded, random_ids), logits(merged, random_ids))
    fresh = build_tiny(config)
    assert {k: v.shape for k, v in reloaded.state_dict().items()} == {k: v.shape for k, v in fresh.state_dict().items()}
    assert reloaded.dtype == dtype
    tied = bool(config.tie_word_embeddings)
    assert (reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight) == tied
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert (out / "generation_config.json").is_file()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert tokenizer.chat_template == tiny_tokenizer.chat_template
    assert tokenizer("what day was i born ?")["input_ids"] == tiny_tokenizer("what day was i born ?")["input_ids"]
    assert json.loads((out / "quantization.json").read_text()) == extra["quantization.json"]
    assert json.loads((out / "merge_report.json").read_text()) == extra["merge_report.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


@pytest.mark.parametrize("arch", ["llama", "llama-tied"])
@pytest.mark.parametrize("head_dtype", [torch.float16, torch.float32])
def test_head_in_its_own_dtype_is_stored_so_and_reloads_exactly(arch, head_dtype, tmp_path, tiny_tokenizer, random_ids):
    """transformers reloads a model in one dtype: config.json says fp32, which holds the bf16 body
    and the head's own dtype exactly, so plain `from_pretrained` computes with the stored weights."""
    merged = merge_to_dense(adapter_model(CONFIGS[arch]()), torch.bfloat16, lm_head_dtype=head_dtype)
    out = save_merged(merged, tiny_tokenizer, tmp_path / "merged")
    stored = _stored_dtypes(out)
    head_key = "lm_head.weight" if arch == "llama" else "model.embed_tokens.weight"  # tied: stored once
    assert stored[head_key] == {torch.float16: "F16", torch.float32: "F32"}[head_dtype]
    assert {d for k, d in stored.items() if k != head_key} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    reloaded, _ = _load_plain(out)
    assert {p.dtype for p in reloaded.parameters()} == {torch.float32}
    for name, tensor in merged.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor.float()), name  # every stored value, unchanged
    with computing_in(merged, torch.float32):  # what merge_report's fidelity check runs: the merged model in fp32
        assert torch.equal(logits(reloaded, random_ids), logits(merged, random_ids))
    # Asked for bf16, transformers rounds the head to it: the trade the merge report names.
    from transformers import AutoModelForCausalLM

    small = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert small.lm_head.weight.dtype == torch.bfloat16


def test_untied_head_reloads_untied_in_plain_transformers(tmp_path, tiny_tokenizer):
    merged = merge_to_dense(adapter_model(CONFIGS["llama-tied"]()), torch.bfloat16, lm_head_dtype=torch.float32,
                            untie_embeddings=True)
    out = save_merged(merged, tiny_tokenizer, tmp_path / "merged")
    stored = _stored_dtypes(out)
    assert stored["lm_head.weight"] == "F32" and stored["model.embed_tokens.weight"] == "BF16"
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    reloaded, _ = _load_plain(out)
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    assert torch.equal(reloaded.lm_head.weight, merged.lm_head.weight)


def test_gguf_sourced_config_saves_as_a_plain_directory(tmp_path, smollm2_path, random_ids):
    """SmolLM2's GGUF config (tied, GGUF-only attributes) and tokenizer, shrunk to a tiny model."""
    from qlorakit.models.gguf_io import load_gguf_metadata

    config, tokenizer = load_gguf_metadata(smollm2_path)
    config.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    merged = merge_to_dense(adapter_model(config), torch.bfloat16)
    assert not hasattr(merged.config, "_model_name_or_path")
    out = save_merged(merged, tokenizer, tmp_path / "merged")
    saved = json.loads((out / "config.json").read_text())
    assert "_model_name_or_path" not in saved and "quantization_config" not in saved
    reloaded, reloaded_tokenizer = _load_plain(out)
    assert torch.equal(logits(reloaded, random_ids), logits(merged, random_ids))
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert reloaded_tokenizer.chat_template == tokenizer.chat_template
    messages = [{"role": "user", "content": "What day was I born?"}]
    assert reloaded_tokenizer.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(messages, tokenize=False)


def test_a_failure_mid_write_leaves_nothing(tmp_path, tiny_tokenizer, monkeypatch):
    merged = merge_to_dense(adapter_model(CONFIGS["llama"]()), torch.bfloat16)

    def fail(self, directory, **kwargs):
        (directory / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk went away")

    monkeypatch.setattr(type(merged), "save_pretrained", fail)
    with pytest.raises(OSError, match="disk went away"):
        save_merged(merged, tiny_tokenizer, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []
    assert getattr(merged.config, "quantization_config", None) is None and merged.config.model_type == "llama"


def test_an_existing_directory_is_refused_unless_overwrite(tmp_path, tiny_tokenizer):
    merged = merge_to_dense(adapter_model(CONFIGS["llama"]()), torch.bfloat16)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeWriteError, match=f"{out}: exists and is not empty; choose another --out or pass --overwrite"):
        save_merged(merged, tiny_tokenizer, out)
    assert (out / "keep.txt").read_text() == "mine"
    save_merged(merged, tiny_tokenizer, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
    empty = tmp_path / "empty"
    empty.mkdir()
    save_merged(merged, tiny_tokenizer, empty)  # an empty directory is fine
    assert (empty / "config.json").is_file()


def test_not_enough_disk_space_is_refused_before_writing(tmp_path, tiny_tokenizer, monkeypatch):
    merged = merge_to_dense(adapter_model(CONFIGS["llama"]()), torch.bfloat16)
    needed = write.state_dict_bytes(merged)
    assert needed == sum(p.numel() * 2 for p in merged.parameters())
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(write.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - needed, needed))  # < size + 10%
    out = tmp_path / "sub" / "merged"
    with pytest.raises(MergeWriteError, match=rf"{out}: not enough disk space: the merged model needs about [\d.]+ KB, {tmp_path} has [\d.]+ KB free"):
        save_merged(merged, tiny_tokenizer, out)
    assert list(tmp_path.iterdir()) == []
