"""The `eval` and `chat` commands: argument parsers and the functions cli.py dispatches to.

With --json a command prints exactly one JSON object on stdout; progress and prompts go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    """Add `eval` and `chat` to the `qlorakit` subparsers (`common` gives --json/--debug)."""
    p = sub.add_parser("eval", parents=[common], help="perplexity and answer accuracy of models, side by side")
    p.add_argument("model", help="a model source (smollm2, .gguf, HF dir, hub id), a run directory or a merged directory")
    p.add_argument("--compare", nargs="+", default=[], metavar="OTHER", help="more models to score on the same data")
    p.add_argument("--data", help="JSONL/JSON/CSV/Parquet rows: text, chat, question/answer, prompt/completion or Alpaca")
    p.add_argument("--metrics", default="ppl,exact,contains,f1", help="comma-separated: ppl,exact,contains,f1")
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens generated per question")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per row scored for perplexity (longer rows are cut)")
    p.add_argument("--lm-eval-tasks", help="also run lm-evaluation-harness tasks (comma-separated; needs `pip install "
                   "lm-eval` and network access for the task data)")
    p.add_argument("--out", help="write the results JSON to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = sub.add_parser("chat", parents=[common], help="chat with a model, run or merged model (streams the reply)")
    p.add_argument("model", help="a model source, a run directory or a merged directory")
    p.add_argument("--adapter", help="a peft adapter directory, a run directory, a loaded adapter's name, or 'none' (base only)")
    p.add_argument("--prompt", help="ask once and exit; without it, read one message per stdin line until EOF or /exit")
    p.add_argument("--max-new-tokens", type=int, default=256, help="greedy tokens generated per reply")


def _default_emit(args: argparse.Namespace, payload: dict, text: str) -> None:
    print(json.dumps(payload, default=str) if getattr(args, "json", False) else text)


def run_eval(args: argparse.Namespace, emit: Callable[[argparse.Namespace, dict, str], None] = _default_emit) -> int:
    from pathlib import Path

    from qlorakit.eval.runner import evaluate, format_results
    from qlorakit.files.atomic import write_json_atomic

    if args.data is None and not getattr(args, "lm_eval_tasks", None):
        raise ValueError("--data: give a data file to evaluate on (or --lm-eval-tasks)")
    models = [args.model, *args.compare]
    progress = not getattr(args, "no_progress", False)
    payload = {"results": [{"model": m, "metrics": {}} for m in models]}
    if args.data is not None:
        payload = evaluate(models, args.data, args.metrics, args.max_new_tokens, progress=progress,
                           max_length=getattr(args, "max_length", 1024))
    if getattr(args, "lm_eval_tasks", None):
        from qlorakit.eval.harness import run_lm_eval

        for result in payload["results"]:
            result["metrics"].update(run_lm_eval(result["model"], args.lm_eval_tasks, progress=progress))
    if getattr(args, "out", None):
        out = Path(args.out)
        write_json_atomic(out, payload)  # its directory made; an old file replaced only when this one is whole
        print(f"wrote {out}", file=sys.stderr)
    emit(args, payload, format_results(payload))
    return 0


def run_chat(args: argparse.Namespace, emit: Callable[[argparse.Namespace, dict, str], None] = _default_emit,
             stdin=None) -> int:
    from qlorakit.eval.chat import chat, select_adapter, user_turns
    from qlorakit.models.restore import load_any

    as_json = getattr(args, "json", False)
    loaded = load_any(args.model, progress=not as_json)
    active = select_adapter(loaded.model, getattr(args, "adapter", None))
    interactive = args.prompt is None
    marker = None
    if interactive and not as_json:
        print(f"chatting with {args.model}" + (f" (adapter {active})" if active else "") + "; /exit or EOF ends",
              file=sys.stderr)
        marker = lambda: print("> ", end="", file=sys.stderr, flush=True)  # noqa: E731
    turns = chat(loaded.model, loaded.tokenizer, user_turns(args.prompt, stdin), args.max_new_tokens,
                 stream=not as_json, prompt_marker=marker)
    if as_json:
        emit(args, {"model": args.model, "adapter": active, "turns": turns}, "")
    return 0
