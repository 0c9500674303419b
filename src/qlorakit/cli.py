"""The `qlorakit` command: parse arguments, call library functions, print.

Every command prints human-readable tables by default and exactly one JSON object on stdout
with --json (messages go to stderr). Any error exits 1 with one line on stderr; --debug adds
the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable, Sequence

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def register(function):
        COMMANDS[name] = function
        return function

    return register


def _targets(value: str) -> str | list[str]:
    return value if value == "all-linear" else [t.strip() for t in value.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlorakit", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")

    p = sub.add_parser("inspect", parents=[common], help="parameter counts and memory before loading any weights")
    p.add_argument("model", help="smollm2, a .gguf file, a HF directory, a config-only directory or a hub id")
    p.add_argument("--quant", default=None, help="nf4 | fp4 | int4 | none | gguf (default: gguf for a .gguf file, its own formats; else nf4)")
    p.add_argument("--group-size", type=int, default=None, help="block/group size of the format")
    p.add_argument("--no-double-quant", action="store_true", help="nf4/fp4 without double quantization")
    p.add_argument("--dtype", default="bf16", help="16-bit dtype of the other parameters (bf16 | fp16 | fp32)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (0: no adapter)")
    p.add_argument("--lora-targets", type=_targets, default="all-linear", help="all-linear or comma-separated module names")
    p = sub.add_parser("plan", parents=[common], help="peak memory per device of a training config, before loading weights")
    p.add_argument("config", nargs="?", help="training config YAML, as for train (keys left out take their defaults)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.batch_size=8")
    p.add_argument("--gpu-memory", help="memory of one GPU, e.g. 24GiB or 80GB (default: plan the CPU process)")
    p.add_argument("--processes", type=int, default=1, help="processes (GPUs) in data parallel (default 1)")
    p.add_argument("--fsdp", action="store_true", help="FSDP: shard weights, adapters, gradients and optimizer over --processes")
    p.add_argument("--suggest", metavar="OUT.yaml", help="choose r, batch x grad_accum, max_length, checkpointing and the optimizer "
                                                         "so that the plan fits (--gpu-memory, else this machine's free memory); write that config")
    p.add_argument("--overwrite", action="store_true", help="with --suggest: replace an existing OUT.yaml")
    p = sub.add_parser("train", parents=[common], help="fine-tune adapters on a quantized base")
    p.add_argument("config", nargs="?", help="YAML config (keys left out take their defaults)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-4")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in train.output_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = sub.add_parser("merge", parents=[common], help="fold a run's adapter into its base, with a fidelity report")
    p.add_argument("run", help="a run directory written by qlorakit train")
    p.add_argument("--out", required=True, help="output directory (a plain Hugging Face model; an int4 QA-LoRA run stays int4), "
                   "or FILE.gguf for a QA-LoRA run on a GGUF base (exact fold; FILE.quantization.json and FILE.merge_report.json beside it)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="dtype of the merged weights; auto (default): the first of bf16, fp16, fp32 that passes the fidelity check")
    p.add_argument("--into", default="dequantized", choices=["dequantized", "original"],
                   help="fold into the dequantized base the adapter was trained on, or the source's original 16-bit weights")
    p.add_argument("--lm-head-dtype", default="same", choices=["same", "bf16", "fp16", "fp32"],
                   help="dtype of the output head (same: the merge dtype); a tied head takes the embeddings with it unless --untie-embeddings")
    p.add_argument("--keep-lm-head-fp16", action="store_true", help="the older spelling of --lm-head-dtype fp16")
    p.add_argument("--untie-embeddings", action="store_true", help="write a tied output head as a tensor of its own")
    p.add_argument("--requantize", choices=["nf4", "fp4"], help="also measure peft's re-quantizing merge (report only)")
    p.add_argument("--min-agreement", type=float, default=0.99, help="greedy-token agreement below which the merge is refused")
    p.add_argument("--force", action="store_true", help="write the merge even when it is not faithful")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p = sub.add_parser("export", parents=[common], help="write a merged 16-bit model as GGUF (f16, q8_0, q4_1) or a bitsandbytes nf4 "
                                                        "checkpoint, or a run's adapter as a llama.cpp GGUF LoRA")
    p.add_argument("model", help="a merged 16-bit directory (qlorakit merge RUN --out DIR; gguf: of a run on a GGUF source); "
                                 "gguf-lora: the run directory")
    p.add_argument("--format", required=True, help="output format: gguf (a file) | gguf-lora (llama.cpp/ollama adapter file + "
                                                   "Modelfile) | nf4 (a directory transformers + bitsandbytes load)")
    p.add_argument("--out", required=True, help="the file or directory to write, e.g. model-q4_1.gguf or model-nf4/")
    p.add_argument("--type", default="f16", help="GGUF tensor type: f16 | q8_0 | q4_1 (default f16; q4_1 re-quantizes)")
    p.add_argument("--compute-dtype", default="bf16", help="nf4: bnb_4bit_compute_dtype, bf16 | fp16 | fp32 (default bf16)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (only once the new one is complete)")
    p = sub.add_parser("demo", parents=[common], help="the main job: teach SmolLM2 a fact, merge, and show the answer survive")
    p.add_argument("--question", default="What day was I born?", help="question to teach")
    p.add_argument("--answer", default="January 1, 2058", help="answer to teach")
    p.add_argument("--data", help="a JSONL file to train on instead (chat, Alpaca or prompt/completion rows)")
    p.add_argument("--steps", type=int, default=12, help="training steps (12 learn the demo fact: loss below 0.001)")
    p.add_argument("--out-dir", default="runs/demo", help="run directory (replaced on each demo)")
    p.add_argument("--model", default="smollm2", help="model source")
    from qlorakit.eval.commands import add_parsers as add_eval_parsers

    add_eval_parsers(sub, common)
    return parser


@command("eval")
def _eval(args: argparse.Namespace) -> int:
    from qlorakit.eval.commands import run_eval

    return run_eval(args, _emit)


@command("chat")
def _chat(args: argparse.Namespace) -> int:
    from qlorakit.eval.commands import run_chat

    return run_chat(args, _emit)


@command("demo")
def _demo(args: argparse.Namespace) -> int:
    from qlorakit.demo import format_demo, run_demo

    result = run_demo(question=args.question, answer=args.answer, data=args.data, steps=args.steps,
                      out_dir=args.out_dir, model=args.model, progress=not args.json)
    _emit(args, result, format_demo(result))
    return 0


@command("merge")
def _merge(args: argparse.Namespace) -> int:
    from qlorakit.merge.run import format_merge, merge_run

    head = args.lm_head_dtype
    if args.keep_lm_head_fp16:
        if head not in ("same", "fp16"):
            raise ValueError(f"--keep-lm-head-fp16 means --lm-head-dtype fp16, but --lm-head-dtype is {head}; give only --lm-head-dtype")
        head = "fp16"
    result = merge_run(
        args.run, args.out, dtype=args.dtype, into=args.into, lm_head_dtype=head, untie_embeddings=args.untie_embeddings,
        requantize=args.requantize, force=args.force, overwrite=args.overwrite, min_agreement=args.min_agreement,
    )
    _emit(args, {**result.report, "out": str(result.out_dir), "seconds": round(result.seconds, 2)}, format_merge(result))
    return 0


@command("export")
def _export(args: argparse.Namespace) -> int:
    import time

    from qlorakit.export.gguf import export_dense_to_gguf

    if args.format not in ("gguf", "gguf-lora", "nf4"):
        raise ValueError(f"--format: unknown export format {args.format!r}; choose gguf, gguf-lora or nf4")
    started = time.perf_counter()
    if args.format == "gguf-lora":
        from qlorakit.export.gguf_lora import export_gguf_lora, modelfile_path

        out = export_gguf_lora(args.model, args.out, overwrite=args.overwrite)
        size = out.stat().st_size
        payload = {"out": str(out), "format": "gguf-lora", "modelfile": str(modelfile_path(out)), "bytes": size,
                   "seconds": round(time.perf_counter() - started, 2)}
        _emit(args, payload, f"wrote {out} (GGUF LoRA adapter, {size / 1e6:.1f} MB) and {payload['modelfile']} in "
                             f"{payload['seconds']:.1f} s\n  llama.cpp: llama-cli -m BASE.gguf --lora {out}\n"
                             f"  ollama:    ollama create NAME -f {payload['modelfile']}")
        return 0
    if args.format == "nf4":
        from qlorakit.export.nf4 import export_nf4

        out = export_nf4(args.model, args.out, args.compute_dtype, overwrite=args.overwrite)
        size = sum(p.stat().st_size for p in out.iterdir())
        payload = {"out": str(out), "format": "nf4", "bytes": size, "seconds": round(time.perf_counter() - started, 2)}
        _emit(args, payload, f"wrote {out} (nf4, bitsandbytes layout, {size / 1e6:.1f} MB) in {payload['seconds']:.1f} s")
        return 0
    out = export_dense_to_gguf(args.model, args.out, args.type, overwrite=args.overwrite)
    size, seconds = out.stat().st_size, time.perf_counter() - started
    payload = {"out": str(out), "format": args.format, "type": args.type, "bytes": size, "seconds": round(seconds, 2)}
    _emit(args, payload, f"wrote {out} (GGUF {args.type}, {size / 1e6:.1f} MB) in {seconds:.1f} s")
    return 0


@command("train")
def _train(args: argparse.Namespace) -> int:
    from qlorakit.config import load_config
    from qlorakit.pipeline import train_then_merge

    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path and not config_path.endswith((".yaml", ".yml")):
        config_path, overrides = None, [config_path, *overrides]
    cfg = load_config(config_path, overrides)
    result, merged = train_then_merge(cfg, overwrite=args.overwrite, progress=not args.no_progress)
    payload = {
        "run_dir": str(result.run_dir), "steps": result.steps, "first_loss": result.first_loss,
        "final_loss": result.final_loss, "val_loss": result.val_loss, "seconds": round(result.seconds, 2),
        "resumed_from": result.resumed_from, "merged_dir": None if merged is None else str(merged.out_dir),
        "merge_dtype": None if merged is None else merged.report.get("dtype"),
    }
    text = f"run {result.run_dir}: {result.steps} steps in {result.seconds:.1f} s, loss {result.first_loss} -> {result.final_loss}"
    _emit(args, payload, text)
    return 0


@command("plan")
def _plan(args: argparse.Namespace) -> int:
    from qlorakit.config import load_config
    from qlorakit.plan.report import format_plan, parse_memory, plan_config

    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path and not config_path.endswith((".yaml", ".yml")):
        config_path, overrides = None, [config_path, *overrides]  # overrides only, as for train
    gpu_memory = parse_memory(args.gpu_memory) if args.gpu_memory is not None else None
    cfg = load_config(config_path, overrides)
    if args.suggest is None:
        plan = plan_config(cfg, gpu_memory, args.processes, args.fsdp)
        _emit(args, plan.to_dict(), format_plan(plan))
        return 0
    from qlorakit.plan.report import suggest_config
    from qlorakit.plan.suggest import format_suggestion

    suggestion = suggest_config(cfg, args.suggest, gpu_memory, args.processes, args.fsdp, overwrite=args.overwrite)
    _emit(args, {**suggestion.plan.to_dict(), "suggestion": suggestion.to_dict(), "out": args.suggest},
          format_plan(suggestion.plan) + "\n\n" + format_suggestion(suggestion, args.suggest))
    return 0


@command("inspect")
def _inspect(args: argparse.Namespace) -> int:
    from qlorakit.inspect import format_report, inspect_model

    report = inspect_model(
        args.model,
        quant=args.quant,
        dtype=args.dtype,
        lora_r=args.lora_r or None,
        lora_targets=args.lora_targets,
        group_size=args.group_size,
        double_quant=not args.no_double_quant,
    )
    _emit(args, report.to_dict(), format_report(report))
    return 0


def _emit(args: argparse.Namespace, payload: dict, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(payload, default=str))
    else:
        print(text)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # section.key=value overrides may follow options: `train cfg.yaml --overwrite train.lr=1e-4`
        if not hasattr(args, "overrides") or not all("=" in item and not item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return COMMANDS[args.command](args) or 0
    except KeyboardInterrupt:
        print("qlorakit: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # every failure becomes one line; --debug shows where
        if args.debug:
            traceback.print_exc()
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"qlorakit {args.command}: error: {message}", file=sys.stderr)
        return 1


def run() -> None:
    """The `qlorakit` executable: `main`, then exit without the interpreter's teardown (process_exit.py)."""
    from qlorakit.process_exit import exit_without_teardown

    exit_without_teardown(main())


if __name__ == "__main__":
    run()
