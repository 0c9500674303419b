"""`qlorakit eval`: score one or more models on one data file, side by side.

    rows ──read/validate──► perplexity examples (template + training masks: the tokens a run learns)
                      └───► question/answer items (prompt turns, gold answer) ──greedy replies──► exact/f1/contains
                                                                              (batched, generation.py)

Question/answer items come from {"question", "answer"} and prompt/completion rows, Alpaca rows
(instruction [+ input] -> output) and chat rows whose last turn is the assistant's (the turns
before it are the prompt). Text rows feed perplexity only. Every model is restored from its own
metadata (models/restore.py: run directory, merged directory, GGUF file or model source) and
freed before the next one loads.

Replies are decoded `batch_size` rows at a time (left-padded with a KV cache, generation.py); the
predictions equal one-row-at-a-time decoding (tests/eval/test_batched_generation.py). Per-row
results (`RowResult`: the row's place in the file, prompt, reference, prediction and its metrics)
back `--predictions FILE.jsonl` and the table's worst rows.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field

import torch

from qlorakit.data.templates import prompt_and_answer
from qlorakit.eval import metrics as M
from qlorakit.generation import DEFAULT_BATCH_SIZE, replies


@dataclass
class EvalData:
    """What one data file offers the metrics.

    Attributes:
        source: the data path, for messages.
        examples: {"input_ids", "labels"} per row with scored tokens (perplexity).
        items: (prompt messages, gold answer) per question/answer row.
        item_where: each item's place in the file ("FILE:LINE").
    """

    source: str
    examples: list[dict] = field(default_factory=list)
    items: list[tuple[list[dict], str]] = field(default_factory=list)
    item_where: list[str] = field(default_factory=list)


@dataclass
class RowResult:
    """One question/answer row as one model answered it (a line of --predictions)."""

    model: str
    row: str  # "FILE:LINE"
    prompt: str  # the last user turn
    reference: str
    prediction: str
    metrics: dict[str, float]

    def to_dict(self) -> dict:
        return {"model": self.model, "row": self.row, "prompt": self.prompt, "reference": self.reference,
                "prediction": self.prediction, "metrics": self.metrics}


@dataclass
class EvalRows:
    """A data file read and validated once, before any model loads (errors come early)."""

    source: str
    format: str
    rows: list[dict]
    where: list[str]

    @property
    def items(self) -> list[tuple[list[dict], str]]:
        return [item for _, item in self.located_items]

    @property
    def located_items(self) -> list[tuple[str, tuple[list[dict], str]]]:
        """("FILE:LINE", (prompt messages, answer)) of every question/answer row."""
        return [(w, item) for w, item in zip(self.where, map(prompt_and_answer, self.rows)) if item is not None]


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
    located = rows.located_items
    return EvalData(rows.source, examples, [item for _, item in located], [w for w, _ in located])


def score_model(model, tokenizer, data: EvalData, metrics: list[str], max_new_tokens: int = 32, bar=None,
                batch_size: int = DEFAULT_BATCH_SIZE, name: str = "") -> tuple[dict[str, float | None], list[RowResult]]:
    """({metric: value}, per-row results) of one loaded model; perplexity per eval/metrics.py."""
    from qlorakit.data.templates import last_user_text
    from qlorakit.quant.linear import cached_dense_weights

    device = next(model.parameters()).device
    result: dict[str, float | None] = {}
    rows: list[RowResult] = []
    with cached_dense_weights(model), torch.no_grad():
        if "ppl" in metrics:
            total, tokens = 0.0, 0
            vocab = model.get_output_embeddings().weight.shape[0]
            for batch in perplexity_batches(data.examples, vocab, batch_size):
                ids, labels, mask = (t.to(device) for t in right_padded(batch))  # (B, W) each
                positions = M.scored_positions(labels)  # (K,): logits only where a token is scored
                logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=positions).logits  # (B, K, V)
                nll, n = M.nll_at(logits, labels, positions)
                total, tokens = total + nll, tokens + n
                _tick(bar, len(batch))
            result["ppl"] = M.perplexity(total, tokens)
        qa = [m for m in metrics if m in M.QA_METRICS]
        if qa:
            predictions = replies(model, tokenizer, [messages for messages, _ in data.items], max_new_tokens,
                                  batch_size, on_batch=lambda n: _tick(bar, n))
            for where, (messages, answer), prediction in zip(data.item_where, data.items, predictions):
                scores = {m: M.QA_FUNCTIONS[m](prediction, answer) for m in qa}
                rows.append(RowResult(name, where, last_user_text(messages), answer, prediction, scores))
            result.update({m: sum(r.metrics[m] for r in rows) / len(rows) for m in qa})
    scores = {m: (None if v is None or math.isnan(v) else v) for m, v in ((m, result.get(m)) for m in metrics)}
    return scores, rows


LOGITS_BUDGET_BYTES = 256 << 20  # fp32 logits of one perplexity batch (B x W x vocab x 4)


def perplexity_batches(examples: list[dict], vocab: int, batch_size: int) -> list[list[dict]]:
    """The examples in batches of similar length (longest first), at most `batch_size` rows and
    LOGITS_BUDGET_BYTES of fp32 logits each (a 262k vocabulary fills it with few rows)."""
    ordered = sorted(examples, key=lambda e: -len(e["input_ids"]))
    batches, start = [], 0
    while start < len(ordered):
        width = len(ordered[start]["input_ids"])
        rows = max(1, min(batch_size, LOGITS_BUDGET_BYTES // max(1, width * vocab * 4)))
        batches.append(ordered[start : start + rows])
        start += rows
    return batches


def right_padded(batch: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels, attention_mask), each (B, W), right-padded: pads come after every real
    token, so causal attention and the default position ids leave the real tokens as they are alone."""
    width = max(len(e["input_ids"]) for e in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), M.IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example["input_ids"])
        ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        mask[row, :n] = 1
    return ids, labels, mask


def _tick(bar, n: int = 1) -> None:
    if bar is not None:
        bar.update(n)


def evaluate(
    models: list[str], data: str, metrics: str | list[str] = "ppl,exact,contains,f1", max_new_tokens: int = 32,
    device: str = "cpu", progress: bool = True, max_length: int | None = 1024, batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict:
    """{"results": [{"model": NAME, "metrics": {METRIC: VALUE}}, ...]} in the order of `models`."""
    return evaluate_rows(models, data, metrics, max_new_tokens, device, progress, max_length, batch_size)[0]


def evaluate_rows(
    models: list[str], data: str, metrics: str | list[str] = "ppl,exact,contains,f1", max_new_tokens: int = 32,
    device: str = "cpu", progress: bool = True, max_length: int | None = 1024, batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[dict, list[RowResult]]:
    """`evaluate`'s payload and every model's per-row results (model by model, rows in file order)."""
    from tqdm.auto import tqdm

    from qlorakit.models.restore import check_loadable, load_any

    names = M.parse_metrics(metrics)
    qa = [m for m in names if m in M.QA_METRICS]
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    rows = read_eval_rows(data)
    if qa and not rows.items:
        raise ValueError(f"{data}: no question/answer rows for {','.join(qa)} (need question/answer, "
                         "prompt/completion, Alpaca or chat rows ending in an assistant turn); use --metrics ppl")
    for name in models:  # every run's files, before the first model loads
        check_loadable(name)
    results, per_row = [], []
    for name in models:
        loaded = load_any(name, device=device, progress=progress)
        evaldata = load_eval_data(rows, loaded.tokenizer, max_length)
        if "ppl" in names and not evaldata.examples:
            raise ValueError(f"{data}: no row has tokens to score for perplexity")
        total = (len(evaldata.examples) if "ppl" in names else 0) + (len(evaldata.items) if qa else 0)
        with tqdm(total=total, desc=f"eval {name}", unit="row", disable=not progress, leave=False) as bar:
            scores, model_rows = score_model(loaded.model, loaded.tokenizer, evaldata, names, max_new_tokens, bar,
                                             batch_size, name)
        results.append({"model": name, "metrics": scores})
        per_row += model_rows
        del loaded
        gc.collect()
    return {"results": results}, per_row


def worst_rows(rows: list[RowResult], count: int = 3) -> list[RowResult]:
    """Per model, up to `count` rows that scored below 1, lowest first (by f1, else contains, else
    exact), ties in file order."""
    worst = []
    for model in dict.fromkeys(r.model for r in rows):
        mine = [r for r in rows if r.model == model]
        key = next(m for m in ("f1", "contains", "exact") if m in mine[0].metrics)
        failed = [r for r in mine if r.metrics[key] < 1]
        worst += sorted(failed, key=lambda r: r.metrics[key])[:count]
    return worst


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_results(payload: dict, rows: list[RowResult] | None = None, worst: int = 3) -> str:
    """One row per model, one column per metric (higher is better except ppl); with per-row
    results, then each model's `worst` lowest-scoring rows (file:line, prompt, reference, prediction)."""
    results = payload["results"]
    metrics = list(dict.fromkeys(m for r in results for m in r["metrics"]))
    width = max([len("model")] + [len(r["model"]) for r in results]) + 2
    lines = [f"{'model':<{width}}" + "".join(f"{m:>10}" for m in metrics)]
    for r in results:
        cells = [r["metrics"].get(m) for m in metrics]
        lines.append(f"{r['model']:<{width}}" + "".join(f"{'-':>10}" if v is None else f"{v:>10.4g}" for v in cells))
    shown = worst_rows(rows or [], worst)
    if shown:
        lines += ["", "worst rows:"]
        for model in dict.fromkeys(r.model for r in shown):
            lines.append(f"  {model}")
            for r in (r for r in shown if r.model == model):
                score = " ".join(f"{m} {v:.2f}" for m, v in r.metrics.items())
                lines.append(f"    {r.row}  {score}")
                lines.append(f"      prompt     {_clip(r.prompt, 70)}")
                lines.append(f"      reference  {_clip(r.reference, 70)}")
                lines.append(f"      prediction {_clip(r.prediction, 70)}")
    return "\n".join(lines)
