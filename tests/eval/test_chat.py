"""`chat` through run_chat with an argparse.Namespace: one-shot, interactive, --json, --adapter."""

import argparse
import io
import json

import pytest

from qlorakit.eval.commands import run_chat
from qlorakit.generation import greedy_reply


def _args(model, **values):
    defaults = dict(model=str(model), adapter=None, prompt=None, max_new_tokens=5, json=False, prompt_file=None,
                    temperature=0.0, top_p=1.0, seed=0, batch_size=16)
    return argparse.Namespace(**{**defaults, **values})


@pytest.fixture(scope="module")
def run_replies(run_dir):
    """Greedy replies of the run (base + adapter) and of its base alone, computed directly."""
    from qlorakit.adapters.multi import AdapterSet
    from qlorakit.models.restore import load_run

    loaded, _ = load_run(run_dir, progress=False)
    with_adapter = greedy_reply(loaded.model, loaded.tokenizer, [{"role": "user", "content": "Hello there"}], 5)
    with AdapterSet(loaded.model).disabled():
        base = greedy_reply(loaded.model, loaded.tokenizer, [{"role": "user", "content": "Hello there"}], 5)
    return with_adapter, base


def test_one_shot_streams_the_reply(run_dir, run_replies, capsys):
    assert run_chat(_args(run_dir, prompt="Hello there")) == 0
    assert capsys.readouterr().out.strip() == run_replies[0]


def test_json_and_adapter_none(run_dir, run_replies, capsys):
    assert run_chat(_args(run_dir, prompt="Hello there", adapter="none", json=True)) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"model": str(run_dir), "adapter": None, "turns": [{"user": "Hello there", "assistant": run_replies[1]}]}


def test_adapter_directory_on_a_plain_model(tiny_model_dir, run_dir, run_replies, capsys):
    """The run's adapter given with --adapter on the 16-bit base; its nf4 run differs, so only check it is used."""
    assert run_chat(_args(tiny_model_dir, prompt="Hello there", adapter=str(run_dir), json=True)) == 0
    assert json.loads(capsys.readouterr().out)["adapter"] == run_dir.name


def test_interactive_reads_lines_until_exit(run_dir, run_replies, capsys):
    stdin = io.StringIO("Hello there\n\nSecond question\n/exit\nnever read\n")
    assert run_chat(_args(run_dir, json=True), stdin=stdin) == 0
    turns = json.loads(capsys.readouterr().out)["turns"]
    assert [t["user"] for t in turns] == ["Hello there", "Second question"]
    assert turns[0]["assistant"] == run_replies[0]


def test_unknown_adapter_is_one_clear_error(tiny_model_dir):
    from qlorakit.adapters.peft_format import AdapterError

    with pytest.raises(AdapterError, match="--adapter nowhere: neither a peft adapter directory nor a loaded adapter"):
        run_chat(_args(tiny_model_dir, prompt="hi", adapter="nowhere"))


def test_prompt_file_answers_each_line_as_prompt_does(run_dir, run_replies, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\n\nWhat is the capital of France?\nA third, longer question about the sea?\n")
    assert run_chat(_args(run_dir, prompt_file=str(prompts), json=True, batch_size=2)) == 0
    turns = json.loads(capsys.readouterr().out)["turns"]
    assert [t["user"] for t in turns] == ["Hello there", "What is the capital of France?", "A third, longer question about the sea?"]
    assert turns[0]["assistant"] == run_replies[0]
    for turn in turns[1:]:
        assert run_chat(_args(run_dir, prompt=turn["user"], json=True)) == 0
        assert json.loads(capsys.readouterr().out)["turns"][0]["assistant"] == turn["assistant"]
    assert run_chat(_args(run_dir, prompt_file=str(prompts))) == 0
    assert capsys.readouterr().out.startswith(f"[1] Hello there\n{run_replies[0]}\n\n[2] ")


def test_sampling_options_reproduce_with_a_seed(run_dir, capsys):
    def sampled(seed):
        assert run_chat(_args(run_dir, prompt="Hello there", json=True, temperature=1.5, top_p=0.95, seed=seed,
                              max_new_tokens=8)) == 0
        return json.loads(capsys.readouterr().out)["turns"][0]["assistant"]

    assert sampled(3) == sampled(3)
    assert len({sampled(s) for s in range(4)}) > 1


def test_prompt_file_errors_before_the_model_loads(tmp_path, monkeypatch):
    import qlorakit.models.restore as restore

    monkeypatch.setattr(restore, "load_any", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(FileNotFoundError, match=r"--prompt-file .*nope\.txt: no such file"):
        run_chat(_args("smollm2", prompt_file=str(tmp_path / "nope.txt")))
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match=r"--prompt-file .*empty\.txt: no prompts"):
        run_chat(_args("smollm2", prompt_file=str(tmp_path / "empty.txt")))
    with pytest.raises(ValueError, match="--temperature must be >= 0"):
        run_chat(_args("smollm2", prompt="hi", temperature=-1.0))
