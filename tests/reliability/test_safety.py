"""Issue #9, safety: weights load only from safetensors and GGUF; a model's own Python code never
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
