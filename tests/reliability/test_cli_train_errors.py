"""`qlorakit train` on bad inputs fails with one line naming the problem, writes nothing, changes
no input. Each case runs the CLI in-process (tests/conftest.py `cli`)."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.reliability.conftest import QA_ROWS, assert_cli_error, snapshot, write_config, write_jsonl

GOOD = "".join(json.dumps(r) + "\n" for r in QA_ROWS)

# name -> (file name, bytes, text the error must contain)
DATA_CASES = {
    "malformed-jsonl-line": ("train.jsonl", (GOOD + '{"instruction": "x", "output": \n').encode(), "train.jsonl:9: invalid JSON"),
    "malformed-json": ("train.json", b'[{"instruction": "a", "output": "b"},\n {"instruction": }]', "train.json:2: invalid JSON"),
    "missing-field": ("train.jsonl", (GOOD + '{"instruction": "only a question"}\n').encode(), "train.jsonl:9: field 'output' is missing"),
    "unknown-fields": ("train.jsonl", b'{"foo": 1, "bar": "x"}\n', "train.jsonl:1: cannot tell the data format"),
    "wrong-type": ("train.jsonl", (GOOD + '{"instruction": "q", "output": 5}\n').encode(), "train.jsonl:9: field 'output' must be a string, got int"),
    "row-not-object": ("train.jsonl", (GOOD + '[1, 2]\n').encode(), "train.jsonl:9: row is a JSON list"),
    "empty-file": ("train.jsonl", b"", "train.jsonl: empty file"),
    "blank-lines-only": ("train.jsonl", b"\n \n\n", "train.jsonl: empty file"),
    "empty-json-list": ("train.json", b"[]", "train.json: empty file"),
    "not-utf8": ("train.jsonl", GOOD.encode() + b'{"instruction": "caf\xe9", "output": "b"}\n', "train.jsonl:9: not valid UTF-8"),
    "csv-too-many-fields": ("train.csv", b"instruction,output\nq,a\nq,a,extra\n", "train.csv:3: row has 3 fields"),
    "all-masked-chat": (
        "train.jsonl",
        "".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"}]}) + "\n" for i in range(4)).encode(),
        "train.jsonl: every row has its labels fully masked (no assistant turn, a template that does not match the "
        "rows, or max_length=48 cutting off every response); nothing to train on",
    ),
    "missing-file": ("absent.jsonl", None, "absent.jsonl: no such file"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data(cli, case, tmp_path, tiny_model_dir):
    name, content, needle = DATA_CASES[case]
    inputs = tmp_path / "in"
    inputs.mkdir()
    data = inputs / name
    if content is not None:
        data.write_bytes(content)
    out = tmp_path / "run"
    config = write_config(inputs / "config.yaml", tiny_model_dir, data, out)
    before = snapshot(inputs, tiny_model_dir)
    last = assert_cli_error(cli("train", config, "--no-progress"), "train", needle)
    assert last.startswith(f"qlorakit train: error: {data}"), last  # the file, by its whole path, first
    assert not out.exists()
    assert snapshot(inputs, tiny_model_dir) == before


CONFIG_CASES = {
    "unknown-key": ({"train": {"lrr": 1e-3}}, "train.lrr"),
    "unknown-section": ({"trian": {"lr": 1e-3}}, "trian"),
    "r-zero": ({"adapter": {"r": 0}}, "adapter.r"),
    "negative-lr": ({"train": {"lr": -1e-3}}, "train.lr"),
    "wrong-type": ({"train": {"batch_size": "four"}}, "train.batch_size"),
    "qalora-group-not-multiple": (
        {"quant": {"method": "int4", "group_size": 32}, "adapter": {"kind": "qalora", "group_size": 48}}, "adapter.group_size"),
    "qalora-on-nf4": ({"adapter": {"kind": "qalora"}}, "adapter.kind"),
    "int4-bad-group": ({"quant": {"method": "int4", "group_size": 48}}, "quant.group_size"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config(cli, case, tmp_path, tiny_model_dir):
    sections, key = CONFIG_CASES[case]
    data = write_jsonl(tmp_path / "train.jsonl", QA_ROWS)
    out = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", tiny_model_dir, data, out, **sections)
    before = snapshot(tmp_path)
    assert_cli_error(cli("train", config), "train", key)
    assert not out.exists()
    assert snapshot(tmp_path) == before


def test_bad_override_names_the_key(cli, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", QA_ROWS)
    out = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", tiny_model_dir, data, out)
    assert_cli_error(cli("train", config, "adapter.r=-2"), "train", "adapter.r")
    assert not out.exists()


def test_invalid_yaml_names_file_and_line(cli, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("train:\n  lr: [1e-3\n  output_dir: x\n")
    assert_cli_error(cli("train", config), "train", str(config))


def _train_case(tmp_path, model, **sections):
    data = write_jsonl(tmp_path / "train.jsonl", QA_ROWS)
    out = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", model, data, out, **sections)
    return config, out


def test_missing_model_path(cli, tmp_path):
    config, out = _train_case(tmp_path, tmp_path / "no-such-model")
    assert_cli_error(cli("train", config), "train", "no-such-model", "no such model")
    assert not out.exists()


def test_only_pickle_weights_refused(cli, tmp_path, tiny_model_dir):
    model = tmp_path / "pickled"
    model.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, model / f.name)
    (model / "pytorch_model.bin").write_bytes(b"not a real pickle; must never be opened")
    config, out = _train_case(tmp_path, model)
    before = snapshot(tmp_path)
    assert_cli_error(cli("train", config), "train", "pytorch_model.bin", "safetensors")
    assert not out.exists()
    assert snapshot(tmp_path) == before


def test_truncated_safetensors(cli, tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    config, out = _train_case(tmp_path, model)
    before = snapshot(tmp_path)
    assert_cli_error(cli("train", config), "train", "model.safetensors")
    assert not out.exists()
    assert snapshot(tmp_path) == before


def test_safetensors_header_garbage(cli, tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    config, out = _train_case(tmp_path, model)
    assert_cli_error(cli("train", config), "train", "model.safetensors")
    assert not out.exists()


@pytest.fixture(scope="module")
def gguf_bytes():
    from qlorakit.models.embedded import smollm2_gguf_path

    return smollm2_gguf_path().read_bytes()


@pytest.mark.parametrize("cut", ["header", "metadata", "tensors"])
def test_truncated_gguf(cli, cut, tmp_path, gguf_bytes):
    size = {"header": 12, "metadata": 200_000, "tensors": len(gguf_bytes) - 4096}[cut]
    model = tmp_path / "model.Q4_1.gguf"
    model.write_bytes(gguf_bytes[:size])
    config, out = _train_case(tmp_path, model, quant={"method": "gguf"})
    before = snapshot(tmp_path)
    assert_cli_error(cli("train", config, "--no-progress"), "train", "model.Q4_1.gguf")
    assert not out.exists()
    assert snapshot(tmp_path) == before


def test_corrupted_gguf_magic(cli, tmp_path, gguf_bytes):
    model = tmp_path / "bad.gguf"
    model.write_bytes(b"GGUX" + gguf_bytes[4:200_000])
    config, out = _train_case(tmp_path, model)
    assert_cli_error(cli("train", config), "train", "bad.gguf")
    assert not out.exists()


def test_targets_match_nothing(cli, tmp_path, tiny_model_dir):
    config, out = _train_case(tmp_path, tiny_model_dir, adapter={"targets": ["no_such_proj"]})
    assert_cli_error(cli("train", config, "--no-progress"), "train", "no_such_proj")
    assert not out.exists()


def test_output_under_a_regular_file(cli, tmp_path, tiny_model_dir):
    blocker = tmp_path / "afile"
    blocker.write_text("keep me\n")
    data = write_jsonl(tmp_path / "train.jsonl", QA_ROWS)
    config = write_config(tmp_path / "config.yaml", tiny_model_dir, data, blocker / "run")
    before = snapshot(tmp_path)
    assert_cli_error(cli("train", config), "train", "train.output_dir", "afile")
    assert snapshot(tmp_path) == before


def test_output_is_a_regular_file(cli, tmp_path, tiny_model_dir):
    blocker = tmp_path / "afile"
    blocker.write_text("keep me\n")
    data = write_jsonl(tmp_path / "train.jsonl", QA_ROWS)
    config = write_config(tmp_path / "config.yaml", tiny_model_dir, data, blocker)
    before = snapshot(tmp_path)
    assert_cli_error(cli("train", config), "train", "train.output_dir")
    assert snapshot(tmp_path) == before


def test_existing_run_refused_then_resumed(cli, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", QA_ROWS)
    out = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", tiny_model_dir, data, out)
    first = cli("train", config, "--no-progress", "train.save_every=1")
    assert first.returncode == 0, first.stderr
    run_files = snapshot(out)

    refused = cli("train", config, "--no-progress", "train.max_steps=4")
    assert_cli_error(refused, "train", "train.output_dir", "already holds a run", "--overwrite", "train.resume")
    assert snapshot(out) == run_files  # the refused start touched nothing

    resumed = cli("train", config, "--no-progress", "train.max_steps=4", "train.resume=true", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / 'checkpoints' / 'step-2'}" in resumed.stderr
    payload = json.loads(resumed.stdout)
    assert payload["steps"] == 4 and payload["resumed_from"].endswith("step-2")
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_resume_without_a_run(cli, tmp_path, tiny_model_dir):
    config, out = _train_case(tmp_path, tiny_model_dir, train={"resume": True})
    assert_cli_error(cli("train", config), "train", "train.resume")
    assert not out.exists()


def test_nonempty_non_run_dir_refused(cli, tmp_path, tiny_model_dir):
    config, out = _train_case(tmp_path, tiny_model_dir)
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    assert_cli_error(cli("train", config), "train", "train.output_dir", "not empty")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_debug_shows_traceback(cli, tmp_path, tiny_model_dir):
    config, out = _train_case(tmp_path, tiny_model_dir, adapter={"r": 0})
    result = cli("--debug", "train", config)
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("qlorakit train: error: adapter.r")


def test_overwrite_never_deletes_an_input(cli, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)  # looks like a run
    data = write_jsonl(out / "train.jsonl", QA_ROWS)  # ... and holds the training data
    config = write_config(tmp_path / "config.yaml", tiny_model_dir, data, out)
    before = snapshot(out)
    assert_cli_error(cli("train", config, "--overwrite"), "train", "--overwrite would delete data.path")
    assert snapshot(out) == before and (out / "checkpoints").is_dir()


def test_long_and_fully_masked_rows_are_reported_not_errors(cli, tmp_path, tiny_model_dir):
    rows = [*QA_ROWS, {"instruction": "long " * 200, "input": "", "output": "short"}]
    data = write_jsonl(tmp_path / "train.jsonl", rows)  # the long row's answer falls past max_length: fully masked
    out = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", tiny_model_dir, data, out)
    before = snapshot(data)
    result = cli("train", config, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    summary = next(line for line in lines if line.startswith("data: "))
    assert "1 truncated (" in summary and "1 fully masked" in summary, summary
    warnings = [line for line in lines if line.startswith("warning: ")]
    long_row = f"{data}:{len(rows)}"
    assert any("1 row longer than data.max_length=" in w and f"{long_row} (" in w for w in warnings), warnings
    assert any("1 row dropped: no trainable token" in w and long_row in w for w in warnings), warnings
    assert snapshot(data) == before


def test_truncated_rows_are_named_with_their_length(tmp_path, smollm2_tokenizer):
    from qlorakit.data.dataset import build_datasets

    long_prompt = {"instruction": "long " * 200, "input": "", "output": "short"}  # answer cut off: dropped
    long_answer = {"instruction": "Say it.", "input": "", "output": "word " * 200}  # truncated, still trains
    rows = [*QA_ROWS, long_prompt, long_answer]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    _, _, report = build_datasets(data, smollm2_tokenizer, max_length=48, shuffle_seed=None)
    assert report.train.truncated_rows == 2
    length = len(smollm2_tokenizer(long_answer["output"], add_special_tokens=False)["input_ids"])
    assert [w.split(" (")[0] for w in report.train.truncated] == [f"{data}:{len(rows) - 1}", f"{data}:{len(rows)}"]
    assert int(report.train.truncated[1].split("(")[1].split(" ")[0].replace(",", "")) > length  # prompt + answer
    assert report.train.masked_rows == (f"{data}:{len(rows) - 1}",)
    truncated_line, masked_line = report.warnings(48, show=1)
    assert truncated_line.startswith("2 rows longer than data.max_length=48 were truncated")
    assert f"{data}:{len(rows) - 1} (" in truncated_line and truncated_line.endswith(" and 1 more")
    assert masked_line.startswith("1 row dropped: no trainable token") and masked_line.endswith(f"{data}:{len(rows) - 1}")
