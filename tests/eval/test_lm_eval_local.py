"""`eval --lm-eval-tasks TASK.yaml`: lm-evaluation-harness on a task of one's own over a local JSONL,
offline, scoring a run directory restored by qlorakit (nf4 base + adapter); the accuracy equals the
one computed by hand from the same model's log-likelihoods of each choice."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from tests.eval.conftest import write_jsonl

pytest.importorskip("lm_eval", reason="make test installs the lm-eval extra")

DOCS = [
    {"question": "The sky on a clear day is", "choices": ["blue", "green", "loud"], "gold": 0},
    {"question": "Two plus two equals", "choices": ["seven", "four", "a cat"], "gold": 1},
    {"question": "Paris is the capital of", "choices": ["Italy", "Spain", "France"], "gold": 2},
    {"question": "Ice is made of frozen", "choices": ["water", "sand", "light"], "gold": 0},
    {"question": "A week has seven", "choices": ["days", "moons", "colours"], "gold": 0},
]
TASK = """task: local_facts
dataset_path: json
dataset_kwargs:
  data_files:
    test: facts.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: gold
metric_list:
  - metric: acc
"""


def _hand_accuracy(model, tokenizer) -> float:
    """For each doc: argmax over choices of sum log p(" " + choice | question), as the harness scores a
    multiple_choice task (target delimiter " ", no BOS for a Llama-family tokenizer through HFLM)."""
    correct = 0
    for doc in DOCS:
        context = tokenizer(doc["question"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer(doc["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            continuation = whole[len(context):]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)  # (T, V)
            scores.append(sum(float(logp[len(context) - 1 + j, t]) for j, t in enumerate(continuation)))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["gold"])
    return correct / len(DOCS)


def test_local_task_yaml_scores_a_run_offline(run_dir, tmp_path, capsys, monkeypatch):
    from qlorakit.eval.commands import run_eval
    from qlorakit.models.restore import load_run

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "tasks"
    folder.mkdir()
    write_jsonl(folder / "facts.jsonl", DOCS)
    (folder / "facts.yaml").write_text(TASK)
    monkeypatch.chdir(tmp_path)  # the data path is taken from the YAML's folder, not the working directory
    args = argparse.Namespace(model=str(run_dir), compare=[], data=None, metrics="ppl", max_new_tokens=8, max_length=64,
                              lm_eval_tasks=str(folder / "facts.yaml"), out=None, no_progress=True, json=True,
                              predictions=None, batch_size=4)
    assert run_eval(args) == 0
    metrics = json.loads(capsys.readouterr().out)["results"][0]["metrics"]
    loaded, _ = load_run(run_dir, progress=False)
    assert metrics["local_facts/acc"] == pytest.approx(_hand_accuracy(loaded.model, loaded.tokenizer))


def test_task_yaml_errors_name_the_file(tmp_path):
    from qlorakit.eval.harness import task_list

    with pytest.raises(FileNotFoundError, match=r"--lm-eval-tasks .*missing\.yaml: no such task YAML"):
        task_list(str(tmp_path / "missing.yaml"))
    (tmp_path / "t.yaml").write_text(TASK)
    with pytest.raises(FileNotFoundError, match=r"t\.yaml: dataset_kwargs\.data_files facts\.jsonl: no such file"):
        task_list(str(tmp_path / "t.yaml"))
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match=r"list\.yaml: not a task YAML"):
        task_list(str(tmp_path / "list.yaml"))
    assert task_list("arc_easy, hellaswag") == ["arc_easy", "hellaswag"]
