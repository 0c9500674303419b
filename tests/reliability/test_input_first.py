"""Every input is checked before a model loads: `merge`, `eval` and `chat` of a run with a damaged
adapter, config.yaml or quantization.json fail naming the file, and the model loader is never called
(it is replaced by one that fails the test). The CLI runs in-process."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from qlorakit.cli import main
from qlorakit.files.safetensors_check import SafetensorsFileError, check_safetensors
from tests.reliability.conftest import QA_ROWS, captured_error_line, one_step_run, write_jsonl


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    return one_step_run(tmp_path_factory.mktemp("input-first"), tiny_model_dir)


@pytest.fixture
def no_model_load(monkeypatch):
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr("qlorakit.models.restore.load_model", refuse)
    return calls


def _cut(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[: keep(len(data))])


# name -> (file under the run, damage, text the error must contain besides the file's path)
DAMAGES = {
    "adapter-truncated-half": ("adapter/adapter_model.safetensors", lambda p: _cut(p, lambda n: n // 2), "truncated"),
    "adapter-truncated-in-header": ("adapter/adapter_model.safetensors", lambda p: _cut(p, lambda n: 100), "truncated"),
    "adapter-truncated-last-byte": ("adapter/adapter_model.safetensors", lambda p: _cut(p, lambda n: n - 1), "truncated"),
    "adapter-trailing-bytes": ("adapter/adapter_model.safetensors", lambda p: p.write_bytes(p.read_bytes() + b"\0" * 8),
                               "after the last tensor"),
    "adapter-empty": ("adapter/adapter_model.safetensors", lambda p: p.write_bytes(b""), "truncated"),
    "adapter-missing": ("adapter", lambda p: (p / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
    "adapter-config-bad-json": ("adapter/adapter_config.json", lambda p: p.write_text('{"r": 4,'), "invalid JSON"),
    "adapter-config-no-rank": ("adapter/adapter_config.json",
                               lambda p: p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "r"})),
                               "r must be a positive number"),
    "config-yaml-unknown-key": ("config.yaml", lambda p: p.write_text(p.read_text() + "extra: {a: 1}\n"), "extra"),
    "config-yaml-bad-yaml": ("config.yaml", lambda p: p.write_text(p.read_text() + "train: [\n"), "invalid YAML"),
    "quantization-json-bad-json": ("quantization.json", lambda p: p.write_text('{"method": '), "invalid JSON"),
    "quantization-json-not-object": ("quantization.json", lambda p: p.write_text("[1, 2]\n"), "not a JSON object"),
}


def _damaged_run(run_dir, tmp_path, case):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    name, damage, needle = DAMAGES[case]
    damage(run / name)
    return run, run / name, needle


@pytest.mark.parametrize("case", list(DAMAGES))
def test_merge_checks_the_run_before_loading(case, run_dir, tmp_path, no_model_load, capsys):
    run, damaged, needle = _damaged_run(run_dir, tmp_path, case)
    out = tmp_path / "merged"
    last = captured_error_line(capsys, main(["merge", str(run), "--out", str(out)]), "merge")
    assert str(damaged) in last and needle in last, last
    assert no_model_load == [] and not out.exists()


def test_merge_of_a_sound_run_does_load(run_dir, tmp_path, no_model_load, capsys):
    """The check above is not vacuous: an undamaged run reaches the loader."""
    last = captured_error_line(capsys, main(["merge", str(run_dir), "--out", str(tmp_path / "merged")]), "merge")
    assert "a model was loaded" in last and len(no_model_load) == 1


def test_eval_checks_every_run_before_the_first_loads(run_dir, tmp_path, no_model_load, capsys):
    """The damaged run is the second one compared: it is refused before the first one loads."""
    run, damaged, _ = _damaged_run(run_dir, tmp_path, "adapter-truncated-half")
    data = write_jsonl(tmp_path / "eval.jsonl", QA_ROWS[:2])
    last = captured_error_line(capsys, main(["eval", str(run_dir), "--compare", str(run), "--data", str(data)]), "eval")
    assert str(damaged) in last and "truncated" in last, last
    assert no_model_load == []


def test_chat_checks_the_run_before_loading(run_dir, tmp_path, no_model_load, capsys):
    run, damaged, _ = _damaged_run(run_dir, tmp_path, "adapter-config-bad-json")
    last = captured_error_line(capsys, main(["chat", str(run), "--prompt", "hi"]), "chat")
    assert str(damaged) in last and no_model_load == []


def test_truncated_message_gives_both_sizes(run_dir, tmp_path):
    run, damaged, _ = _damaged_run(run_dir, tmp_path, "adapter-truncated-last-byte")
    with pytest.raises(SafetensorsFileError, match=r"truncated: its header describes [\d,]+ bytes of tensor data, the file holds [\d,]+"):
        check_safetensors(damaged)
    names = check_safetensors(run_dir / "adapter" / "adapter_model.safetensors")
    assert names and all(".lora_" in name for name in names)


def test_mis_sized_tensor_entry_is_named(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 12)
    with pytest.raises(SafetensorsFileError, match=r"tensor w: 12 bytes for shape \[2, 2\] F32 \(needs 16\)"):
        check_safetensors(path)
