"""The `eval` and `chat` commands: argument parsers and the functions cli.py dispatches to.

With --json a command prints exactly one JSON object on stdout; progress and prompts go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from qlorakit.generation import DEFAULT_BATCH_SIZE


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    """Add `eval` and `chat` to the `qlorakit` subparsers (`common` gives --json/--debug)."""
    p = sub.add_parser("eval", parents=[common], help="perplexity and answer accuracy of models, side by side")
    p.add_argument("model", help="a model source (smollm2, .gguf, HF dir, hub id), a run directory or a merged directory")
    p.add_argument("--compare", nargs="+", default=[], metavar="OTHER", help="more models to score on the same data")
    p.add_argument("--data", help="JSONL/JSON/CSV/Parquet rows: text, chat, question/answer, prompt/completion or Alpaca")
    p.add_argument("--metrics", default="ppl,exact,contains,f1", help="comma-separated: ppl,exact,contains,f1")
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens generated per question")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="questions decoded together (left-padded, "
                   "KV cache); the predictions equal one-at-a-time decoding")
    p.add_argument("--predictions", metavar="FILE.jsonl", help="write one line per model and question: model, row, "
                   "prompt, reference, prediction, metrics")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per row scored for perplexity (longer rows are cut)")
    p.add_argument("--lm-eval-tasks", help="also run lm-evaluation-harness tasks, comma-separated: task names, or "
                   "task YAML files over local data (offline); needs `pip install 'qlorakit[lm-eval]'`")
    p.add_argument("--out", help="write the results JSON to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = sub.add_parser("chat", parents=[common], help="chat with a model, run or merged model (streams the reply)")
    p.add_argument("model", help="a model source, a run directory or a merged directory")
    p.add_argument("--adapter", help="a peft adapter directory, a run directory, a loaded adapter's name, or 'none' (base only)")
    p.add_argument("--prompt", help="ask once and exit; without it, read one message per stdin line until EOF or /exit")
    p.add_argument("--prompt-file", help="answer every line of this file (one prompt per line, blank lines skipped), "
                   "each on its own, decoded in batches")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens generated per reply")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 (the default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens whose probability reaches P")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (the same seed gives the same replies)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="--prompt-file lines decoded together")


def _default_emit(args: argparse.Namespace, payload: dict, text: str) -> None:
    print(json.dumps(payload, default=str) if getattr(args, "json", False) else text)


def run_eval(args: argparse.Namespace, emit: Callable[[argparse.Namespace, dict, str], None] = _default_emit) -> int:
    from pathlib import Path

    from qlorakit.eval.runner import evaluate_rows, format_results
    from qlorakit.files.atomic import check_creatable, write_json_atomic, write_text_atomic

    if args.data is None and not getattr(args, "lm_eval_tasks", None):
        raise ValueError("--data: give a data file to evaluate on (or --lm-eval-tasks)")
    models = [args.model, *args.compare]
    progress = not getattr(args, "no_progress", False)
    predictions = getattr(args, "predictions", None)
    if predictions is not None and args.data is None:
        raise ValueError("--predictions: needs --data (the rows whose predictions it lists)")
    if predictions is not None:
        check_creatable(predictions)  # before any model loads
    payload = {"results": [{"model": m, "metrics": {}} for m in models]}
    rows = []
    if args.data is not None:
        payload, rows = evaluate_rows(models, args.data, args.metrics, args.max_new_tokens, progress=progress,
                                      max_length=getattr(args, "max_length", 1024),
                                      batch_size=getattr(args, "batch_size", DEFAULT_BATCH_SIZE))
    if getattr(args, "lm_eval_tasks", None):
        from qlorakit.eval.harness import run_lm_eval

        for result in payload["results"]:
            result["metrics"].update(run_lm_eval(result["model"], args.lm_eval_tasks, progress=progress))
    if predictions is not None:
        write_text_atomic(Path(predictions), "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in rows))
        print(f"wrote {predictions} ({len(rows)} predictions)", file=sys.stderr)
    if getattr(args, "out", None):
        out = Path(args.out)
        write_json_atomic(out, payload)  # its directory made; an old file replaced only when this one is whole
        print(f"wrote {out}", file=sys.stderr)
    emit(args, payload, format_results(payload, rows))
    return 0


def run_chat(args: argparse.Namespace, emit: Callable[[argparse.Namespace, dict, str], None] = _default_emit,
             stdin=None) -> int:
    from qlorakit.eval.chat import answer_each, chat, read_prompt_file, select_adapter, user_turns
    from qlorakit.generation import Sampling
    from qlorakit.models.restore import load_any

    as_json = getattr(args, "json", False)
    sampling = Sampling(getattr(args, "temperature", 0.0), getattr(args, "top_p", 1.0), getattr(args, "seed", 0))
    prompt_file = getattr(args, "prompt_file", None)
    if prompt_file is not None and args.prompt is not None:
        raise ValueError("--prompt-file: give --prompt or --prompt-file, not both")
    prompts = read_prompt_file(prompt_file) if prompt_file is not None else None  # before the model loads
    loaded = load_any(args.model, progress=not as_json)
    active = select_adapter(loaded.model, getattr(args, "adapter", None))
    if prompts is not None:
        turns = answer_each(loaded.model, loaded.tokenizer, prompts, args.max_new_tokens, sampling,
                            getattr(args, "batch_size", DEFAULT_BATCH_SIZE), progress=not as_json)
        text = "\n\n".join(f"[{i}] {t['user']}\n{t['assistant']}" for i, t in enumerate(turns, 1))
        emit(args, {"model": args.model, "adapter": active, "turns": turns}, text)
        return 0
    interactive = args.prompt is None
    marker = None
    if interactive and not as_json:
        print(f"chatting with {args.model}" + (f" (adapter {active})" if active else "") + "; /exit or EOF ends",
              file=sys.stderr)
        marker = lambda: print("> ", end="", file=sys.stderr, flush=True)  # noqa: E731
    turns = chat(loaded.model, loaded.tokenizer, user_turns(args.prompt, stdin), args.max_new_tokens,
                 stream=not as_json, prompt_marker=marker, sampling=sampling)
    if as_json:
        emit(args, {"model": args.model, "adapter": active, "turns": turns}, "")
    return 0
