"""One training configuration in its own process; prints one JSON line.

    python bench/train_worker.py --impl qlorakit --dtype fp32 --steps 4 --warmup 1
    python bench/train_worker.py --impl hf --gc          # the Hugging Face stack reference
    python bench/train_worker.py --impl qlorakit --dtype fp32 --model gemma3-270m --quant gguf   # K-quant blocks
    python bench/train_worker.py --impl qlorakit --dtype fp32 --kind dora   # DoRA (--impl hf: peft's use_dora)

Both sides train SmolLM2-135M-Instruct with LoRA r=16 (alpha 32, dropout 0.05) on all seven
projections (q, k, v, o, gate, up, down) over an NF4 (double-quantized) base, batch 4 x 256
tokens, AdamW lr 2e-4, on the same token rows (see bench/data.py).

qlorakit:     `qlorakit.train.loop.train` on a config (metrics.jsonl gives each step's time).
hf:           transformers + bitsandbytes NF4 (`BitsAndBytesConfig(load_in_4bit, nf4, double quant,
              compute bf16)`), `peft.prepare_model_for_kbit_training`, `get_peft_model`, torch AdamW,
              gradient checkpointing with --gc; the base is a bf16 safetensors copy of the embedded
              GGUF (bench/data.py writes it), since transformers cannot 4-bit-quantize while reading GGUF.

Output: {"impl", "dtype", "gc", "tokens_per_s", "step_seconds": [...], "tokens_per_step",
"peak_rss_mib", "varlen": bool, "real_tokens": ...}. Peak RSS is the whole process's
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`), loading included, for both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import data as bench_data  # noqa: E402  (bench/data.py)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_qlorakit(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="qlk-bench-") as tmp:
        return _train_in(Path(tmp), args)


def _train_in(work: Path, args) -> dict:
    from qlorakit.config import config_from_dict
    from qlorakit.train.loop import train

    rows_path = bench_data.write_rows(work / "rows.jsonl", varlen=args.varlen, seq_len=args.seq_len, count=args.batch * (args.steps + args.warmup))
    cfg = config_from_dict({
        "model": {"name": args.model, "dtype": args.dtype},
        "quant": {"method": args.quant, "double_quant": True},
        "adapter": {"kind": args.kind, "r": 16, "alpha": 32, "dropout": 0.05, "targets": TARGETS},
        "data": {"path": str(rows_path), "format": "text", "max_length": args.seq_len, "packing": args.varlen},
        "train": {"output_dir": str(work / "run"), "max_steps": args.steps + args.warmup, "batch_size": args.batch,
                  "lr": 2e-4, "schedule": "constant", "warmup_ratio": 0.0, "save_every": None,
                  "gradient_checkpointing": args.gc},
    })
    train(cfg, overwrite=True, progress=False)
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("loss") is not None][args.warmup :]
    seconds = [r["tokens"] / r["tokens_per_s"] for r in steps]
    tokens = sum(r["tokens"] for r in steps)
    return {"step_seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / sum(seconds)}


def run_hf(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model_dir = bench_data.hf_copy_of_smollm2()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=dtype)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gc)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM",
                                             use_dora=args.kind == "dora"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    batches = bench_data.token_batches(args.batch, args.seq_len, args.steps + args.warmup)
    model.train()
    seconds = []
    for i, input_ids in enumerate(batches):
        start = time.perf_counter()
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= args.warmup:
            seconds.append(time.perf_counter() - start)
    tokens = args.batch * args.seq_len * len(seconds)
    return {"step_seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / sum(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=["qlorakit", "hf"], required=True)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--gc", action="store_true", help="gradient checkpointing")
    parser.add_argument("--model", default="smollm2", help="qlorakit only: the model (smollm2, gemma3-270m, a path)")
    parser.add_argument("--quant", default="nf4", help="qlorakit only: quant.method (nf4, or gguf: the file's own blocks)")
    parser.add_argument("--kind", choices=["lora", "dora"], default="lora", help="adapter.kind (peft: use_dora)")
    parser.add_argument("--varlen", action="store_true", help="instruction-like lengths, packed (qlorakit only)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="measured steps")
    parser.add_argument("--warmup", type=int, default=1, help="steps run before measuring")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    result = (run_qlorakit if args.impl == "qlorakit" else run_hf)(args)
    result.update(impl=args.impl, kind=args.kind, model=args.model, quant=args.quant if args.impl == "qlorakit" else "nf4", dtype=args.dtype, gc=args.gc, varlen=args.varlen, batch=args.batch, seq_len=args.seq_len,
                  peak_rss_mib=round(peak_rss_mib(), 1), wall_seconds=round(time.perf_counter() - started, 1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
