"""`qlorakit eval`: score one or more models on one data file, side by side.

    rows ──read/validate──► perplexity examples (template + training masks: the tokens a run learns)
                      └───► question/answer items (prompt turns, gold answer) ──greedy generate──► exact/f1/contains

Question/answer items come from {"question", "answer"} and prompt/completion rows, Alpaca rows
(instruction [+ input] -> output) and chat rows whose last turn is the assistant's (the turns
before it are the prompt). Text rows feed perplexity only. Every model is restored from its own
metadata (models/restore.py: run directory, merged directory, GGUF file or model source) and
freed before the next one loads.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field

import torch

from qlorakit.data.templates import prompt_and_answer
from qlorakit.eval import metrics as M
from qlorakit.generation import greedy_reply


@dataclass
class EvalData:
    """What one data file offers the metrics.

    Attributes:
        source: the data path, for messages.
        examples: {"input_ids", "labels"} per row with scored tokens (perplexity).
        items: (prompt messages, gold answer) per question/answer row.
    """

    source: str
    examples: list[dict] = field(default_factory=list)
    items: list[tuple[list[dict], str]] = field(default_factory=list)


@dataclass
class EvalRows:
    """A data file read and validated once, before any model loads (errors come early)."""

    source: str
    format: str
    rows: list[dict]
    where: list[str]

    @property
    def items(self) -> list[tuple[list[dict], str]]:
        return [item for item in map(prompt_and_answer, self.rows) if item is not None]


def read_eval_rows(path: str) -> EvalRows:
    """Read and validate `path` (any format data/formats.py knows)."""
    from qlorakit.data.formats import resolve_format, validate_rows
    from qlorakit.data.read import read_rows

    table = read_rows(path)
    fmt = resolve_format(table, "auto")
    return EvalRows(str(path), fmt, validate_rows(table, fmt), [table.where(i) for i in range(len(table))])


def load_eval_data(path: str | EvalRows, tokenizer, max_length: int | None = 1024) -> EvalData:
    """Rows of `path` as perplexity examples (template + training masks) and QA items."""
    from qlorakit.data.templates import choose_template, make_renderer
    from qlorakit.data.tokenize import tokenize_rows

    rows = path if isinstance(path, EvalRows) else read_eval_rows(path)
    render = make_renderer(choose_template("auto", rows.format, tokenizer), rows.format, tokenizer)
    rendered = [render(row, w) for row, w in zip(rows.rows, rows.where)]
    examples, _ = tokenize_rows(rendered, rows.where, tokenizer, max_length=max_length, require_trainable=False, source=rows.source)
    return EvalData(rows.source, examples, rows.items)


def score_model(model, tokenizer, data: EvalData, metrics: list[str], max_new_tokens: int = 32, bar=None) -> dict[str, float | None]:
    """{metric: value} of one loaded model; perplexity per module docstring of eval/metrics.py."""
    from qlorakit.quant.linear import cached_dense_weights

    device = next(model.parameters()).device
    result: dict[str, float | None] = {}
    with cached_dense_weights(model), torch.no_grad():
        if "ppl" in metrics:
            total, tokens = 0.0, 0
            for example in data.examples:
                ids = torch.tensor([example["input_ids"]], device=device)  # (1, T)
                labels = torch.tensor([example["labels"]], device=device)  # (1, T)
                nll, n = M.token_nll(model(input_ids=ids).logits, labels)
                total, tokens = total + nll, tokens + n
                _tick(bar)
            result["ppl"] = M.perplexity(total, tokens)
        qa = [m for m in metrics if m in M.QA_METRICS]
        if qa:
            sums = dict.fromkeys(qa, 0.0)
            for messages, answer in data.items:
                reply = greedy_reply(model, tokenizer, messages, max_new_tokens)
                for m in qa:
                    sums[m] += M.QA_FUNCTIONS[m](reply, answer)
                _tick(bar)
            result.update({m: sums[m] / len(data.items) for m in qa})
    return {m: (None if v is None or math.isnan(v) else v) for m, v in ((m, result.get(m)) for m in metrics)}


def _tick(bar) -> None:
    if bar is not None:
        bar.update(1)


def evaluate(
    models: list[str], data: str, metrics: str | list[str] = "ppl,exact,contains,f1", max_new_tokens: int = 32,
    device: str = "cpu", progress: bool = True, max_length: int | None = 1024,
) -> dict:
    """{"results": [{"model": NAME, "metrics": {METRIC: VALUE}}, ...]} in the order of `models`."""
    from tqdm.auto import tqdm

    from qlorakit.models.restore import check_loadable, load_any

    names = M.parse_metrics(metrics)
    qa = [m for m in names if m in M.QA_METRICS]
    rows = read_eval_rows(data)
    if qa and not rows.items:
        raise ValueError(f"{data}: no question/answer rows for {','.join(qa)} (need question/answer, "
                         "prompt/completion, Alpaca or chat rows ending in an assistant turn); use --metrics ppl")
    for name in models:  # every run's files, before the first model loads
        check_loadable(name)
    results = []
    for name in models:
        loaded = load_any(name, device=device, progress=progress)
        evaldata = load_eval_data(rows, loaded.tokenizer, max_length)
        if "ppl" in names and not evaldata.examples:
            raise ValueError(f"{data}: no row has tokens to score for perplexity")
        total = (len(evaldata.examples) if "ppl" in names else 0) + (len(evaldata.items) if qa else 0)
        with tqdm(total=total, desc=f"eval {name}", unit="row", disable=not progress, leave=False) as bar:
            scores = score_model(loaded.model, loaded.tokenizer, evaldata, names, max_new_tokens, bar)
        results.append({"model": name, "metrics": scores})
        del loaded
        gc.collect()
    return {"results": results}


def format_results(payload: dict) -> str:
    """One row per model, one column per metric (higher is better except ppl)."""
    results = payload["results"]
    metrics = list(dict.fromkeys(m for r in results for m in r["metrics"]))
    width = max([len("model")] + [len(r["model"]) for r in results]) + 2
    lines = [f"{'model':<{width}}" + "".join(f"{m:>10}" for m in metrics)]
    for r in results:
        cells = [r["metrics"].get(m) for m in metrics]
        lines.append(f"{r['model']:<{width}}" + "".join(f"{'-':>10}" if v is None else f"{v:>10.4g}" for v in cells))
    return "\n".join(lines)
