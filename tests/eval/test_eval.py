"""`eval` over two models (plain tiny base, and a run-like directory: nf4 base + adapter)."""

import argparse
import json
import math

import pytest
import torch

from qlorakit.eval.metrics import QA_FUNCTIONS
from qlorakit.eval.runner import evaluate, format_results, load_eval_data
from qlorakit.generation import greedy_reply
from tests.eval.conftest import write_jsonl


def _args(**values):
    defaults = dict(compare=[], data=None, metrics="ppl,exact,contains,f1", max_new_tokens=6, max_length=64,
                    lm_eval_tasks=None, out=None, no_progress=True, json=True, predictions=None, batch_size=16)
    return argparse.Namespace(**{**defaults, **values})


def test_qa_items_from_each_format(tmp_path, smollm2_tokenizer):
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                      {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]},
        {"messages": [{"role": "user", "content": "no answer here"}]},
    ])
    data = load_eval_data(str(chat), smollm2_tokenizer)
    assert len(data.items) == 1 and data.items[0][1] == "Paris" and len(data.items[0][0]) == 3
    assert len(data.examples) == 1  # the row without an assistant turn has nothing to score
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "one two three"}])
    data = load_eval_data(str(text), smollm2_tokenizer)
    assert data.items == [] and len(data.examples) == 1


@pytest.mark.slow
def test_eval_two_models_in_order(tiny_model_dir, run_dir, qa_file, tmp_path, capsys):
    from qlorakit.eval.commands import run_eval
    from qlorakit.models.restore import load_any

    out = tmp_path / "results.json"
    assert run_eval(_args(model=str(tiny_model_dir), compare=[str(run_dir)], data=str(qa_file), out=str(out))) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert [r["model"] for r in printed["results"]] == [str(tiny_model_dir), str(run_dir)]
    base, run = (r["metrics"] for r in printed["results"])
    assert list(base) == ["ppl", "exact", "contains", "f1"]
    assert base["ppl"] != pytest.approx(run["ppl"], rel=1e-3)  # the adapter (and nf4) change the model

    # the base's numbers, recomputed by hand: exp(mean answer-token NLL) and metrics of greedy replies
    loaded = load_any(str(tiny_model_dir), progress=False)
    data = load_eval_data(str(qa_file), loaded.tokenizer, 64)
    nll = n = 0
    for example in data.examples:
        labels = torch.tensor([example["labels"]])
        with torch.no_grad():
            loss = loaded.model(torch.tensor([example["input_ids"]]), labels=labels).loss
        count = int((labels[0, 1:] != -100).sum())
        nll, n = nll + float(loss) * count, n + count
    assert base["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-3)
    replies = [greedy_reply(loaded.model, loaded.tokenizer, messages, 6) for messages, _ in data.items]
    for metric in ("exact", "contains", "f1"):
        expected = sum(QA_FUNCTIONS[metric](r, a) for r, (_, a) in zip(replies, data.items)) / len(replies)
        assert base[metric] == pytest.approx(expected)
    table = format_results(printed)
    assert str(run_dir) in table.splitlines()[2] and "ppl" in table.splitlines()[0]


def test_eval_errors(tiny_model_dir, tmp_path):
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "one two three"}])
    with pytest.raises(ValueError, match="no question/answer rows for exact"):  # found before any model loads
        evaluate([str(tmp_path / "no-such-model")], str(text), "ppl,exact", progress=False)
    with pytest.raises(ValueError, match="unknown metric bleu"):
        evaluate([str(tiny_model_dir)], str(text), "bleu", progress=False)
    result = evaluate([str(tiny_model_dir)], str(text), "ppl", progress=False)
    assert set(result["results"][0]["metrics"]) == {"ppl"} and result["results"][0]["metrics"]["ppl"] > 1


def test_lm_eval_missing_is_one_line_with_the_install_command(monkeypatch):
    import builtins

    from qlorakit.eval.harness import run_lm_eval

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(RuntimeError, match=r"^--lm-eval-tasks needs lm-evaluation-harness: pip install 'qlorakit\[lm-eval\]' \(.*network"):
        run_lm_eval("smollm2", "arc_easy")


def test_parsers_match_the_cli_wiring(tmp_path):
    """add_parsers plugs into a parser built like cli.py's (common parent giving --json/--debug)."""
    from qlorakit.eval.commands import add_parsers, run_chat, run_eval

    parser = argparse.ArgumentParser(prog="qlorakit")
    parser.add_argument("--debug", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    add_parsers(sub, common)
    args = parser.parse_args(["eval", "M", "--compare", "A", "B", "--data", "d.jsonl", "--metrics", "ppl", "--out", "o.json", "--json"])
    assert (args.model, args.compare, args.data, args.metrics, args.out, args.json) == ("M", ["A", "B"], "d.jsonl", "ppl", "o.json", True)
    assert args.max_new_tokens == 32 and args.lm_eval_tasks is None
    args = parser.parse_args(["chat", "RUN", "--adapter", "none", "--prompt", "hi", "--max-new-tokens", "4"])
    assert (args.model, args.adapter, args.prompt, args.max_new_tokens, args.json) == ("RUN", "none", "hi", 4, False)
    with pytest.raises(ValueError, match="--data: give a data file"):
        run_eval(_args(model="M"))
    assert callable(run_chat)


def test_predictions_file_and_worst_rows(tiny_model_dir, run_dir, tmp_path, capsys):
    """--predictions: one line per model and question row, whose metrics average to the table's; the
    text table lists each model's worst rows; the JSON keeps its shape."""
    from qlorakit.eval.commands import run_eval

    rows = [{"question": "What colour is the sky?", "answer": "Blue"}, {"question": "Name a fruit.", "answer": "An apple."},
            {"question": "Say hello", "answer": "hello"}]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    predictions = tmp_path / "out" / "predictions.jsonl"
    args = _args(model=str(tiny_model_dir), compare=[str(run_dir)], data=str(data), predictions=str(predictions),
                 batch_size=2)
    assert run_eval(args) == 0
    payload = json.loads(capsys.readouterr().out)
    assert set(payload) == {"results"} and all(set(r) == {"model", "metrics"} for r in payload["results"])
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [(line["model"], line["row"]) for line in lines] == [
        (model, f"{data}:{n}") for model in (str(tiny_model_dir), str(run_dir)) for n in (1, 2, 3)]
    assert [line["reference"] for line in lines[:3]] == ["Blue", "An apple.", "hello"]
    assert lines[2]["prompt"] == "Say hello" and set(lines[0]) == {"model", "row", "prompt", "reference", "prediction", "metrics"}
    for result in payload["results"]:
        mine = [line for line in lines if line["model"] == result["model"]]
        for metric in ("exact", "contains", "f1"):
            assert result["metrics"][metric] == pytest.approx(sum(line["metrics"][metric] for line in mine) / 3)
            for line in mine:
                assert line["metrics"][metric] == QA_FUNCTIONS[metric](line["prediction"], line["reference"])

    assert run_eval(_args(model=str(tiny_model_dir), data=str(data), json=False, batch_size=2)) == 0
    table = capsys.readouterr().out
    assert "worst rows:" in table and f"{data}:1" in table and "reference  Blue" in table


def test_eval_batch_size_does_not_change_the_replies(tiny_model_dir, tmp_path):
    from qlorakit.eval.runner import evaluate_rows

    rows = [{"question": q, "answer": "x"} for q in ("Hi", "What is the capital of France?", "Why is the sea salty?", "Ok")]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    one = evaluate_rows([str(tiny_model_dir)], str(data), "exact", 6, progress=False, batch_size=1)[1]
    four = evaluate_rows([str(tiny_model_dir)], str(data), "exact", 6, progress=False, batch_size=4)[1]
    assert [r.prediction for r in one] == [r.prediction for r in four]
    with pytest.raises(ValueError, match="--batch-size must be at least 1"):
        evaluate_rows([str(tiny_model_dir)], str(data), "exact", progress=False, batch_size=0)
