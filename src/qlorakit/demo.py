"""`qlorakit demo`, the main job (seed 000): a fact learned by QLoRA survives the merge.

    base          ask the embedded SmolLM2 (NF4, adapter off) a question it cannot answer
    trained       QLoRA-train the single example until the answer is learned, ask again (the
                  base's dense weights are kept for the 12 short steps: +0.4 GiB, ~3 s faster,
                  the same numbers; `qlorakit train` dequantizes on every use)
    merged        dequantize + fold in fp32, write a plain fp32 HF directory, reload it with vanilla
                  transformers (no qlorakit code), ask again; fp32 whatever the compute dtype: a
                  bf16 cast loses much of a 12-step update (see merge/run.py), and the fidelity
                  figures compare the trained model computing in fp32 (models/precision.py)
    requantized   what peft's re-quantizing merge_and_unload would have given, ask again

Each stage records (answer, contains the answer?, seconds); the merge's fidelity figures come
from merge/fidelity.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from qlorakit.dtypes import preferred_dtype
from qlorakit.generation import greedy_reply, user_turn
from qlorakit.models.load import LoadedModel

DEFAULT_QUESTION = "What day was I born?"
DEFAULT_ANSWER = "January 1, 2058"


def _set_adapters_disabled(model, disabled: bool) -> None:
    for module in model.modules():
        if hasattr(module, "lora_A"):
            module.disabled = disabled


def _stage(name: str, answer: str, expected: str, seconds: float) -> dict:
    return {"stage": name, "answer": answer, "contains": expected in answer, "seconds": round(seconds, 2)}


def _first_example(data: str) -> tuple[str, str]:
    """(question, answer) of the first row of a JSONL file (chat, Alpaca or prompt/completion)."""
    from qlorakit.data.formats import resolve_format, validate_rows
    from qlorakit.data.read import read_rows
    from qlorakit.data.templates import last_user_text, prompt_and_answer

    table = read_rows(data)
    row = validate_rows(table, resolve_format(table, "auto"))[0]
    pair = prompt_and_answer(row)
    if pair is None:
        raise ValueError(f"{data}: the first row has no question and answer (a chat row must end with the assistant's turn)")
    return last_user_text(pair[0]), pair[1]


def _demo_config(model: str, data: Path, out_dir: Path, steps: int, dtype: str):
    from qlorakit.config import config_from_dict

    return config_from_dict({
        "model": {"name": model, "dtype": dtype},
        "quant": {"method": "nf4", "double_quant": True},
        "adapter": {"kind": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear"},
        "data": {"path": str(data), "max_length": 256},
        "train": {"output_dir": str(out_dir), "max_steps": steps, "batch_size": 1, "lr": 1e-3, "schedule": "constant",
                  "warmup_ratio": 0.0, "max_grad_norm": 1.0, "save_every": None, "seed": 42},
        "merge": {"dtype": "fp32"},
    })


def run_demo(question: str = DEFAULT_QUESTION, answer: str = DEFAULT_ANSWER, data: str | None = None, steps: int = 12,
             out_dir: str = "runs/demo", model: str = "smollm2", progress: bool = True) -> dict:
    from transformers import AutoModelForCausalLM

    from qlorakit.merge.run import merge_loaded
    from qlorakit.models.sources import resolve_source
    from qlorakit.quant.linear import cached_dense_weights
    from qlorakit.train.loop import train

    started = time.perf_counter()
    run_dir = Path(out_dir)
    if data is None:
        data_path = run_dir.parent / f"{run_dir.name}-data" / "fact.jsonl"
        data_path.parent.mkdir(parents=True, exist_ok=True)
        row = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
        data_path.write_text(json.dumps(row) + "\n")
    else:
        data_path = Path(data)
        question, answer = _first_example(data)
    dtype = preferred_dtype()
    cfg = _demo_config(model, data_path, run_dir, steps, dtype)

    result = train(cfg, overwrite=True, progress=progress, keep_dense_weights=True)  # 135M at batch 1: memory is no concern
    trained_model, tokenizer = result.model, result.tokenizer

    def ask(candidate) -> str:
        return greedy_reply(candidate, tokenizer, user_turn(question), max_new_tokens=20)

    stages = []
    with cached_dense_weights(trained_model):
        t = time.perf_counter()
        _set_adapters_disabled(trained_model, True)
        stages.append(_stage("base", ask(trained_model), answer, time.perf_counter() - t))
        _set_adapters_disabled(trained_model, False)
        t = time.perf_counter()
        stages.append(_stage("trained", ask(trained_model), answer, time.perf_counter() - t))
    stages[1]["train_seconds"] = round(result.seconds, 2)

    loaded = LoadedModel(trained_model, tokenizer, resolve_source(model))
    merge = merge_loaded(loaded, cfg, run_dir / "merged", dtype=cfg.merge.dtype, requantize="nf4", force=True, overwrite=True)
    t = time.perf_counter()
    plain = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=merge.merged_model.dtype).eval()
    stages.append(_stage("merged", ask(plain), answer, time.perf_counter() - t))
    t = time.perf_counter()
    requantized = merge.requantized_model  # what peft's merge_and_unload would have kept, built by the merge
    with cached_dense_weights(requantized):
        stages.append(_stage("requantized", ask(requantized), answer, time.perf_counter() - t))
    fidelity = {k: v for k, v in merge.fidelity.to_dict().items() if k != "rows"}
    fidelity["update_kept"], fidelity["update_noise"] = merge.survival["kept"], merge.survival["noise"]
    rq = merge.requantized_fidelity.to_dict()
    requantized_fidelity = {k: v for k, v in rq.items() if k != "rows"}
    requantized_fidelity["update_kept"] = merge.requantized_survival["kept"]
    requantized_fidelity["update_noise"] = merge.requantized_survival["noise"]
    return {
        "question": question, "answer": answer, "model": model, "dtype": dtype, "run_dir": str(run_dir),
        "merged_dir": str(merge.out_dir), "stages": stages, "fidelity": fidelity,
        "requantized_fidelity": requantized_fidelity, "total_seconds": round(time.perf_counter() - started, 2),
    }


def format_demo(result: dict) -> str:
    width = max(len(repr(s["answer"])) for s in result["stages"]) + 2
    lines = [f"question: {result['question']!r}   expected answer: {result['answer']!r}   ({result['dtype']} compute, merged to fp32)", "",
             f"{'stage':<13}{'answer':<{width}}{'contains?':<11}{'seconds':>8}"]
    for s in result["stages"]:
        lines.append(f"{s['stage']:<13}{s['answer']!r:<{width}}{'yes' if s['contains'] else 'no':<11}{s['seconds']:>8.2f}")
    f, r = result["fidelity"], result["requantized_fidelity"]
    lines += [
        "",
        f"{'fidelity vs the trained model':<34}{'max |logit diff|':>17}{'mean KL':>10}{'agreement':>11}{'update kept':>13}{'noise':>7}",
        f"{'dequantize + fold (qlorakit)':<34}{f['max_abs_logit_diff']:>17.4g}{f['mean_kl']:>10.3g}{f['greedy_token_agreement']:>11.4f}"
        f"{f['update_kept']:>13.3f}{f['update_noise']:>7.3f}",
        f"{'re-quantize to nf4 (peft)':<34}{r['max_abs_logit_diff']:>17.4g}{r['mean_kl']:>10.3g}{r['greedy_token_agreement']:>11.4f}"
        f"{r['update_kept']:>13.3f}{r['update_noise']:>7.3f}",
        "",
        f"run {result['run_dir']}, merged model {result['merged_dir']}; total {result['total_seconds']:.1f} s",
    ]
    return "\n".join(lines)
