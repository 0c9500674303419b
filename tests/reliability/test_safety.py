"""Safety: weights load only from safetensors and GGUF; a model's own Python code never
runs unless the user turns trust_remote_code on (qlorakit's CLI has no switch for it)."""

from __future__ import annotations

import json
import shutil

import pytest

from qlorakit.models.load import load_model
from qlorakit.models.sources import ModelSourceError, resolve_source
from tests.reliability.conftest import QA_ROWS, assert_cli_error, run_cli, snapshot, write_config, write_jsonl

EVIL = '''
import pathlib
pathlib.Path({marker!r}).write_text("remote code ran")
from transformers import LlamaConfig
class EvilConfig(LlamaConfig):
    model_type = "evil_llama"
'''


@pytest.fixture
def remote_code_model(tmp_path, tiny_model_dir):
    model = tmp_path / "evil-model"
    shutil.copytree(tiny_model_dir, model)
    marker = tmp_path / "REMOTE_CODE_RAN"
    (model / "evil.py").write_text(EVIL.format(marker=str(marker)))
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="evil_llama", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    (model / "config.json").write_text(json.dumps(config))
    return model, marker


def test_remote_code_never_runs_from_cli(tmp_path, remote_code_model):
    model, marker = remote_code_model
    data = write_jsonl(tmp_path / "train.jsonl", QA_ROWS)
    out = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", model, data, out)
    before = snapshot(model)
    assert_cli_error(run_cli("train", config, "--no-progress"), "train", "trust_remote_code")
    assert not marker.exists()
    assert not out.exists()
    assert snapshot(model) == before


def test_remote_code_off_by_default_in_library(remote_code_model):
    model, marker = remote_code_model
    with pytest.raises(Exception) as caught:
        load_model(str(model), dtype="fp32", quant="none", progress=False)
    assert "trust_remote_code" in str(caught.value)
    assert not marker.exists()


def test_pickle_only_directory_refused_before_reading(tmp_path, tiny_model_dir):
    model = tmp_path / "pickled"
    model.mkdir()
    shutil.copy(tiny_model_dir / "config.json", model / "config.json")
    (model / "model.pt").write_bytes(b"\x80\x04 never unpickled")
    with pytest.raises(ModelSourceError, match="safetensors and GGUF only"):
        resolve_source(model)


def test_non_gguf_file_refused(tmp_path):
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\x80\x04 never unpickled")
    with pytest.raises(ModelSourceError, match="not a .gguf file"):
        resolve_source(weights)


def test_pickle_beside_safetensors_is_ignored(tmp_path, tiny_model_dir):
    """With both, only the safetensors file is read: a poisoned .bin next to it is never opened."""
    model = tmp_path / "both"
    shutil.copytree(tiny_model_dir, model)
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04 this is not a pickle; reading it would fail")
    loaded = load_model(str(model), dtype="fp32", quant="none", progress=False)
    assert sum(p.numel() for p in loaded.model.parameters()) > 0


# --- model.allow_pickle_weights: pytorch_model.bin only on request, and then only tensors ------------------

def _pickled_copy(model_dir, dest, state=None):
    """`model_dir` with its safetensors weights replaced by pytorch_model.bin (torch.save of `state`)."""
    import torch
    from safetensors.torch import load_file

    dest.mkdir()
    for f in model_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dest / f.name)
    torch.save(load_file(str(model_dir / "model.safetensors")) if state is None else state, dest / "pytorch_model.bin")
    return dest


class _Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        import shlex

        return os.system, (f"touch {shlex.quote(self.marker)}",)


def test_pickle_weights_refused_by_default_naming_file_and_opt_in(tmp_path, tiny_model_dir):
    model = _pickled_copy(tiny_model_dir, tmp_path / "pickled")
    data = write_jsonl(tmp_path / "train.jsonl", QA_ROWS)
    out = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", model, data, out)
    before = snapshot(model)
    assert_cli_error(run_cli("train", config), "train", str(model / "pytorch_model.bin"), "safetensors and GGUF only",
                     "model.allow_pickle_weights=true", "weights_only=True")
    assert not out.exists()
    assert snapshot(model) == before


def test_pickle_weights_opt_in_loads_the_same_model(tmp_path, tiny_model_dir):
    import torch

    model = _pickled_copy(tiny_model_dir, tmp_path / "pickled")
    with pytest.raises(ModelSourceError):
        resolve_source(model)
    source = resolve_source(model, allow_pickle_weights=True)
    assert source.kind == "hf_dir" and source.pickle_weights
    got = load_model(source, dtype="fp32", quant="none", progress=False).model.state_dict()
    want = load_model(str(tiny_model_dir), dtype="fp32", quant="none", progress=False).model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_pickle_weights_opt_in_through_the_cli(tmp_path, tiny_model_dir):
    model = _pickled_copy(tiny_model_dir, tmp_path / "pickled")
    data = write_jsonl(tmp_path / "train.jsonl", QA_ROWS)
    out = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", model, data, out)
    before = snapshot(model)
    result = run_cli("train", config, "--no-progress", "model.allow_pickle_weights=true", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "allow_pickle_weights: true" in (out / "config.yaml").read_text()  # the consent is recorded with the run
    assert snapshot(model) == before


@pytest.mark.parametrize("where", ["inside-state-dict", "whole-file"])
def test_malicious_pickle_rejected_even_with_opt_in(where, tmp_path, tiny_model_dir):
    import pickle

    import torch

    marker = tmp_path / "PICKLE_CODE_RAN"
    model = _pickled_copy(tiny_model_dir, tmp_path / "evil")
    weights = model / "pytorch_model.bin"
    if where == "inside-state-dict":  # a real-looking state dict, one entry of which is the payload
        state = torch.load(weights, weights_only=True)
        state["model.norm.weight"] = _Payload(marker)
        torch.save(state, weights)
    else:
        weights.write_bytes(pickle.dumps(_Payload(marker)))
    data = write_jsonl(tmp_path / "train.jsonl", QA_ROWS)
    out = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", model, data, out)
    before = snapshot(model)
    last = assert_cli_error(run_cli("train", config, "model.allow_pickle_weights=true"), "train", str(weights),
                            "weights_only=True")
    if where == "inside-state-dict":
        assert "system" in last  # the refused global is named
    assert not marker.exists()
    assert not out.exists()
    assert snapshot(model) == before
    # the payload is live: a plain unpickle of the same file runs it (so the check above could fail)
    try:
        torch.load(weights, weights_only=False)
    except RuntimeError:  # whole-file: the payload runs where torch expects its magic number, then this
        pass
    assert marker.exists()
