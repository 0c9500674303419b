"""`make bench`: qlorakit against the Hugging Face stack, on this machine, in one run.

    python bench/run.py [--rounds 3] [--steps 6] [--out bench/results/latest.json]

Every configuration runs in its own process (bench/train_worker.py, bench/tasks.py). The headline
pair (qlorakit and hf_reference) is interleaved round by round, so that a change in machine load
hits both; every other configuration runs once. Reported (medians over rounds; peak RSS is the largest):
  tokens_per_s / peak_rss_mib     qlorakit (its preferred compute dtype: bf16 on CUDA and on CPUs with native
                                  bf16, fp32 elsewhere; qlorakit.dtypes.preferred_dtype), qlorakit_other_allocator
                                  (the mmap threshold qlorakit does not pick for this dtype: 1 MiB for bf16,
                                  32 MiB for fp32; qlorakit/allocator.py), hf_reference (transformers +
                                  peft + bitsandbytes NF4, compute bf16 where the CPU has native bf16, else fp32:
                                  the dtype a user of that machine picks), hf_reference_gc (the same with
                                  gradient checkpointing), hf_reference_fp32, qlorakit_bf16. On a CPU that
                                  emulates bf16 (bench/peak.py measures it) the bf16 rows are skipped, and say
                                  so under "skipped", unless --bf16-rows
  mfu                             achieved FLOPs / the best matmul peak measured in this run (bench/peak.py)
  varlen_tokens_per_s             real (non-padding) tokens/s on instruction-like lengths, packed
  dora_tokens_per_s               the qlorakit row with adapter.kind dora (dora_vs_lora: against the qlorakit row)
  gemma3_tokens_per_s             Gemma 3 270M Q4_K_M (gemma3-270m) trained over the file's own blocks (quant gguf)
                                  and the same model in NF4, batch 2 x 256; gemma3_gguf_vs_nf4 is their ratio
  demo_seconds                    `make demo`, end to end
  load_seconds                    import to NF4 + LoRA ready to train (warm cache; cold in load_seconds_cold),
                                  split into load_import_seconds and load_seconds_after_imports
  merge_seconds                   `qlorakit merge` of the demo run (with its fidelity report)
  gguf_merge_seconds              QA-LoRA merge of a GGUF run written as .gguf (with its fidelity report)
  generate_tokens_per_s           greedy generation, NF4 base + adapter, dense weights cached: batch 1 and
                                  batch 16 (generate_tokens_per_s_batch16), qlorakit's decoder
  eval_seconds                    the held-out eval (bench/heldout.py: 60 test rows whose names never occur in
                                  training, SmolLM2 against a run trained on 400 rows; exact,contains,f1,ppl,
                                  48 new tokens) at the default batch and one row at a time, in the same run;
                                  eval_speedup is their ratio, eval_same_predictions whether every row agrees
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PY = sys.executable
QLORAKIT = [PY, "-m", "qlorakit"]


def _flops_per_token(seq_len: int = 256, r: int = 16) -> float:
    """Matmul FLOPs per trained token of SmolLM2-135M (frozen base, LoRA r on all 7 projections):
    forward 2·P + backward input-gradient 2·P over the linear layers and the head, causal attention
    (QKᵀ and AV over seq_len/2 positions on average, backward 2x forward), and the adapters
    (forward 2·r·(in+out), backward twice that)."""
    d, layers, heads, kv_heads, head_dim, inter, vocab = 576, 30, 9, 3, 64, 1536, 49152
    shapes = [(d, heads * head_dim), (d, kv_heads * head_dim), (d, kv_heads * head_dim), (heads * head_dim, d),
              (d, inter), (d, inter), (inter, d)]  # (in, out) of q k v o gate up down
    linear = layers * sum(i * o for i, o in shapes) + vocab * d
    attention = layers * 2 * 2 * (seq_len / 2) * heads * head_dim  # QKᵀ + AV, forward
    adapters = layers * sum(2 * r * (i + o) for i, o in shapes)
    return 4 * linear + 3 * attention + 3 * adapters


def _run_json(argv: list[str], label: str, timeout: float = 900, env: dict | None = None) -> dict:
    """Run one process; its last stdout line is a JSON object. Failures are recorded, not raised."""
    start = time.perf_counter()
    print(f"[bench] {label} ...", file=sys.stderr, flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", **(env or {})}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"[bench] {label} FAILED ({proc.returncode}): {tail}", file=sys.stderr, flush=True)
        return {"error": tail, "wall_seconds": wall}
    result = json.loads(lines[-1])
    result["wall_seconds"] = round(wall, 2)
    print(f"[bench] {label}: {json.dumps({k: v for k, v in result.items() if k != 'step_seconds'})}", file=sys.stderr, flush=True)
    return result


def _worker(name: str, *flags: str, steps: int) -> tuple[str, list[str]]:
    return name, [PY, str(BENCH / "train_worker.py"), "--steps", str(steps), *flags]


def other_allocator(dtype: str) -> dict[str, str]:
    """The environment that gives a `dtype` run the mmap threshold qlorakit does not pick for it
    (a user's MALLOC_MMAP_THRESHOLD_ is left alone by qlorakit)."""
    from qlorakit.allocator import REUSE_THRESHOLD_BYTES, RETURN_THRESHOLD_BYTES, mmap_threshold_for

    other = RETURN_THRESHOLD_BYTES if mmap_threshold_for(dtype) == REUSE_THRESHOLD_BYTES else REUSE_THRESHOLD_BYTES
    return {"MALLOC_MMAP_THRESHOLD_": str(other)}


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return round(statistics.median(values), 2) if values else None


def _max(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return round(max(values), 1) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the headline pair, qlorakit and hf_reference (the median discards one outlier)")
    parser.add_argument("--steps", type=int, default=6, help="measured training steps per process (after one warm-up step; bf16 heap fragmentation settles after about 5)")
    parser.add_argument("--out", default=str(BENCH / "results" / "latest.json"))
    parser.add_argument("--bf16-rows", action="store_true", help="run the bf16 rows even where the CPU emulates bf16 (hours)")
    args = parser.parse_args()
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="qlk-bench-"))
    from qlorakit.dtypes import preferred_dtype

    fast = preferred_dtype()
    subprocess.run([PY, str(BENCH / "data.py"), "prepare"], cwd=ROOT, check=True, capture_output=True)
    peak = _run_json([PY, str(BENCH / "peak.py")], "matmul peak")
    bf16_native = fast == "bf16"
    reference = "bf16" if bf16_native else "fp32"  # the HF stack at the dtype a user of this machine picks
    skipped: dict[str, str] = {}
    if not (bf16_native or args.bf16_rows):
        why = (f"bf16 matmul is emulated on this CPU ({peak.get('bf16_gflops')} GFLOPS against {peak.get('fp32_gflops')} "
               f"in fp32, bench/peak.py): not run (--bf16-rows runs it)")
        skipped = {"qlorakit_bf16": why, "hf_reference_bf16": why}

    main_configs = [  # the headline pair, interleaved over rounds
        _worker("qlorakit", "--impl", "qlorakit", "--dtype", fast, steps=args.steps),
        _worker("hf_reference", "--impl", "hf", "--dtype", reference, steps=args.steps),
    ]
    extra_configs = [  # one process each
        _worker("hf_reference_gc", "--impl", "hf", "--dtype", reference, "--gc", steps=args.steps),
        _worker("qlorakit_other_allocator", "--impl", "qlorakit", "--dtype", fast, steps=args.steps),
        _worker("hf_reference_fp32", "--impl", "hf", "--dtype", "fp32", steps=args.steps),
        _worker("qlorakit_bf16", "--impl", "qlorakit", "--dtype", "bf16", steps=args.steps),
        _worker("qlorakit_gc", "--impl", "qlorakit", "--dtype", fast, "--gc", steps=args.steps),
        _worker("varlen", "--impl", "qlorakit", "--dtype", fast, "--varlen", steps=args.steps),
        _worker("qlorakit_dora", "--impl", "qlorakit", "--dtype", fast, "--kind", "dora", steps=args.steps),
        # Gemma 3 270M Q4_K_M over its own blocks (q4_k, q6_k, q5_0, q8_0) against the same model in NF4
        _worker("gemma3_gguf", "--impl", "qlorakit", "--dtype", fast, "--model", "gemma3-270m", "--quant", "gguf",
                "--batch", "2", steps=args.steps),
        _worker("gemma3_nf4", "--impl", "qlorakit", "--dtype", fast, "--model", "gemma3-270m", "--quant", "nf4",
                "--batch", "2", steps=args.steps),
    ]
    if reference == "fp32":  # hf_reference is the fp32 run already
        extra_configs = [c for c in extra_configs if c[0] != "hf_reference_fp32"]
    extra_configs = [c for c in extra_configs if c[0] not in skipped]
    runs: dict[str, list[dict]] = {name: [] for name, _ in main_configs + extra_configs}
    for round_index in range(args.rounds):
        for name, argv in main_configs:
            runs[name].append(_run_json(argv, f"{name} (round {round_index + 1})"))
    for name, argv in extra_configs:
        env = other_allocator(fast) if name == "qlorakit_other_allocator" else None
        runs[name].append(_run_json(argv, name, env=env))

    demo = _timed_make_demo()
    load_warm = _run_json([PY, str(BENCH / "tasks.py"), "load"], "load (warm cache)")
    load_cold = _run_json([PY, str(BENCH / "tasks.py"), "load", "--cold"], "load (cold cache)")
    merge = _run_json([*QLORAKIT, "merge", "runs/demo", "--out", str(work / "merged"), "--dtype", "fp32", "--json"], "merge")
    gguf_train = _run_json([*QLORAKIT, "train", "configs/qalora-gguf.yaml", f"train.output_dir={work / 'qalora'}",
                            "train.max_steps=2", "--no-progress", "--json"], "QA-LoRA GGUF training (2 steps, not timed)")
    gguf_merge = _run_json([*QLORAKIT, "merge", str(work / "qalora"), "--out", str(work / "qalora.gguf"), "--json"], "QA-LoRA GGUF merge")
    generate = _run_json([PY, str(BENCH / "tasks.py"), "generate", "runs/demo"], "generation")
    held_out = _eval_bench(work / "heldout")

    flops = _flops_per_token()
    best_peak = max(peak.get("bf16_gflops", 0), peak.get("fp32_gflops", 0)) * 1e9 or None
    tokens = {name: _median(r, "tokens_per_s") for name, r in runs.items()}
    if "hf_reference_fp32" not in runs:
        runs["hf_reference_fp32"] = runs["hf_reference"]
        tokens["hf_reference_fp32"] = tokens["hf_reference"]
    for name in skipped:
        runs.setdefault(name, [])
        tokens.setdefault(name, None)

    def mfu(name: str, peak_flops: float | None) -> float | None:
        return round(tokens[name] * flops / peak_flops, 4) if tokens.get(name) and peak_flops else None

    result = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), **peak},
        "model": "SmolLM2-135M-Instruct (embedded Q4_1 GGUF; NF4 double-quant base), LoRA r=16 alpha=32 dropout=0.05 on "
                 "q,k,v,o,gate,up,down, batch 4 x 256, AdamW",
        "qlorakit_dtype": fast,
        "hf_reference_dtype": reference,
        "skipped": skipped,
        "flops_per_token": flops,
        "tokens_per_s": {"qlorakit": tokens["qlorakit"], "hf_reference": tokens["hf_reference"],
                         "hf_reference_gc": tokens["hf_reference_gc"], "hf_reference_fp32": tokens["hf_reference_fp32"],
                         "qlorakit_bf16": tokens["qlorakit_bf16"], "qlorakit_gc": tokens["qlorakit_gc"],
                         "qlorakit_other_allocator": tokens["qlorakit_other_allocator"]},
        "speedup_vs_hf_reference": _ratio(tokens["qlorakit"], tokens["hf_reference"]),
        "speedup_vs_hf_reference_fp32": _ratio(tokens["qlorakit"], tokens["hf_reference_fp32"]),
        "speedup_other_allocator_vs_hf_reference": _ratio(tokens["qlorakit_other_allocator"], tokens["hf_reference"]),
        "other_allocator_mmap_threshold": int(other_allocator(fast)["MALLOC_MMAP_THRESHOLD_"]),
        "peak_rss_mib": {name: _max(runs[name], "peak_rss_mib") for name in
                         ("qlorakit", "hf_reference", "hf_reference_gc", "hf_reference_fp32", "qlorakit_bf16", "qlorakit_gc",
                          "qlorakit_other_allocator")},
        "mfu": {name: mfu(name, best_peak) for name in ("qlorakit", "qlorakit_other_allocator", "hf_reference", "hf_reference_gc", "hf_reference_fp32")},
        "mfu_vs_bf16_peak": {name: mfu(name, peak.get("bf16_gflops", 0) * 1e9) for name in ("qlorakit", "hf_reference")},
        "gemma3_tokens_per_s": {"gguf_blocks": tokens["gemma3_gguf"], "nf4": tokens["gemma3_nf4"]},
        "gemma3_peak_rss_mib": {"gguf_blocks": _max(runs["gemma3_gguf"], "peak_rss_mib"), "nf4": _max(runs["gemma3_nf4"], "peak_rss_mib")},
        "gemma3_gguf_vs_nf4": _ratio(tokens["gemma3_gguf"], tokens["gemma3_nf4"]),
        "dora_tokens_per_s": tokens["qlorakit_dora"],
        "dora_peak_rss_mib": _max(runs["qlorakit_dora"], "peak_rss_mib"),
        "dora_vs_lora": _ratio(tokens["qlorakit_dora"], tokens["qlorakit"]),
        "varlen_tokens_per_s": tokens["varlen"],
        "varlen_vs_fixed": _ratio(tokens["varlen"], tokens["qlorakit"]),
        "demo_seconds": demo.get("seconds"),
        "load_seconds": _round(load_warm.get("seconds")),
        "load_seconds_cold": _round(load_cold.get("seconds")),
        "load_import_seconds": _round(load_warm.get("import_seconds")),
        "load_seconds_after_imports": _round(load_warm.get("after_import_seconds")),
        "merge_seconds": merge.get("wall_seconds") if "error" not in merge else None,
        "merge_seconds_in_process": merge.get("seconds"),
        "gguf_merge_seconds": gguf_merge.get("wall_seconds") if "error" not in gguf_merge else None,
        "generate_tokens_per_s": _round(generate.get("batch1_tokens_per_s")),
        "generate_tokens_per_s_batch16": _round(generate.get("batch16_tokens_per_s")),
        "eval_seconds": held_out.get("seconds"),
        "eval_speedup": held_out.get("speedup"),
        "eval_same_predictions": held_out.get("same_predictions"),
        "eval_metrics": held_out.get("metrics"),
        "eval_train_seconds": held_out.get("train_seconds"),
        "errors": {k: v["error"] for k, v in {"demo": demo, "load": load_warm, "merge": merge, "gguf_train": gguf_train,
                                               "gguf_merge": gguf_merge, "generate": generate, "peak": peak,
                                               "eval": held_out}.items() if "error" in v}
                  | {f"{name}[{i}]": r["error"] for name, rs in runs.items() for i, r in enumerate(rs) if "error" in r},
        "runs": runs,
        "bench_seconds": round(time.perf_counter() - started, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(format_table(result))
    print(f"\nwrote {out} in {result['bench_seconds']:.0f} s")


def _eval_bench(folder: Path) -> dict:
    """Train SmolLM2 (NF4, LoRA r 16) on bench/heldout.py's 400 rows, then `qlorakit eval smollm2
    --compare RUN` on its 60 held-out rows at the default batch and at --batch-size 1 (one row at a
    time, as eval decoded before batching), each timed end to end in its own process."""
    sys.path.insert(0, str(BENCH))
    from heldout import write_task

    train, test = write_task(folder)
    config = folder / "config.yaml"
    config.write_text(
        "model: {name: smollm2, dtype: fp32}\nquant: {method: nf4}\n"
        "adapter: {kind: lora, r: 16, alpha: 32, dropout: 0.0, targets: all-linear}\n"
        f"data: {{path: {train}, max_length: 128}}\n"
        f"train: {{output_dir: {folder / 'run'}, max_steps: 24, batch_size: 4, lr: 2.0e-3, schedule: constant, "
        "warmup_ratio: 0.0, save_every: null}\n")
    trained = _run_json([*QLORAKIT, "train", str(config), "--no-progress", "--json"], "held-out task training (24 steps)")
    if "error" in trained:
        return trained
    evals = {}
    for label, batch in (("batched", []), ("one_row", ["--batch-size", "1"])):
        evals[label] = _run_json([*QLORAKIT, "eval", "smollm2", "--compare", str(folder / "run"), "--data", str(test),
                                  "--metrics", "exact,contains,f1,ppl", "--max-new-tokens", "48", "--no-progress", "--json",
                                  "--predictions", str(folder / f"{label}.jsonl"), *batch], f"held-out eval ({label})")
        if "error" in evals[label]:
            return evals[label]
    predictions = [[json.loads(line)["prediction"] for line in (folder / f"{label}.jsonl").read_text().splitlines()]
                   for label in evals]
    seconds = {label: evals[label]["wall_seconds"] for label in evals}
    return {"seconds": seconds, "speedup": _ratio(seconds["one_row"], seconds["batched"]),
            "same_predictions": predictions[0] == predictions[1],
            "metrics": {label: evals[label]["results"] for label in evals},
            "train_seconds": trained["wall_seconds"]}


def _timed_make_demo() -> dict:
    start = time.perf_counter()
    print("[bench] make demo ...", file=sys.stderr, flush=True)
    proc = subprocess.run(["make", "demo"], cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = round(time.perf_counter() - start, 1)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["make demo failed"])[-1], "seconds": None}
    print(f"[bench] make demo: {seconds} s", file=sys.stderr, flush=True)
    return {"seconds": seconds}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def _round(value: float | None, digits: int = 2) -> float | None:
    return round(value, digits) if value is not None else None


def format_table(r: dict) -> str:
    """The table of docs/performance.md: one row per figure."""
    t, rss, mfu = r["tokens_per_s"], r["peak_rss_mib"], r["mfu"]
    rows = [
        ("training tokens/s, qlorakit " + r["qlorakit_dtype"], t["qlorakit"], f"peak RSS {rss['qlorakit']} MiB, MFU {mfu['qlorakit']}"),
        (f"training tokens/s, qlorakit, other allocator mode (MALLOC_MMAP_THRESHOLD_={r['other_allocator_mmap_threshold'] >> 20} MiB)",
         t["qlorakit_other_allocator"], f"peak RSS {rss['qlorakit_other_allocator']} MiB, MFU {mfu['qlorakit_other_allocator']}, "
         f"{r['speedup_other_allocator_vs_hf_reference']} x HF reference"),
        (f"training tokens/s, HF stack {r['hf_reference_dtype']} (reference)", t["hf_reference"], f"peak RSS {rss['hf_reference']} MiB, MFU {mfu['hf_reference']}"),
        (f"training tokens/s, HF stack {r['hf_reference_dtype']} + checkpointing", t["hf_reference_gc"], f"peak RSS {rss['hf_reference_gc']} MiB"),
        ("training tokens/s, HF stack fp32", t["hf_reference_fp32"], f"peak RSS {rss['hf_reference_fp32']} MiB"),
        ("training tokens/s, qlorakit bf16" + (" (a third run)" if r["qlorakit_dtype"] == "bf16" else ""), t["qlorakit_bf16"],
         f"peak RSS {rss['qlorakit_bf16']} MiB" if t["qlorakit_bf16"] else r["skipped"].get("qlorakit_bf16", "")),
        ("training tokens/s, qlorakit + checkpointing", t["qlorakit_gc"], f"peak RSS {rss['qlorakit_gc']} MiB"),
        ("qlorakit / HF reference", r["speedup_vs_hf_reference"], f"vs HF fp32: {r['speedup_vs_hf_reference_fp32']}"),
        ("training tokens/s, qlorakit DoRA", r["dora_tokens_per_s"],
         f"peak RSS {r['dora_peak_rss_mib']} MiB; {r['dora_vs_lora']} x LoRA (dropout 0.05: W₀ x is recomputed on the dropped-out input)"),
        ("variable-length real tokens/s (packed)", r["varlen_tokens_per_s"], f"{r['varlen_vs_fixed']} x fixed-length"),
        ("Gemma 3 270M Q4_K_M over its own blocks, tokens/s", r["gemma3_tokens_per_s"]["gguf_blocks"],
         f"batch 2 x 256, peak RSS {r['gemma3_peak_rss_mib']['gguf_blocks']} MiB; {r['gemma3_gguf_vs_nf4']} x the same model in NF4 "
         f"({r['gemma3_tokens_per_s']['nf4']} tokens/s, peak RSS {r['gemma3_peak_rss_mib']['nf4']} MiB)"),
        ("make demo, seconds", r["demo_seconds"], ""),
        ("embedded model ready to train, seconds", r["load_seconds"], f"of which imports (torch, transformers' Llama, bitsandbytes) {r['load_import_seconds']}, "
         f"qlorakit's load {r['load_seconds_after_imports']}; cold cache: {r['load_seconds_cold']}"),
        ("merge of SmolLM2 (with fidelity report), seconds", r["merge_seconds"],
         f"`qlorakit merge` wall clock; the merge itself (after imports and loading) {r['merge_seconds_in_process']}"),
        ("QA-LoRA GGUF merge + write, seconds", r["gguf_merge_seconds"], ""),
        ("generation tokens/s, batch 1", r["generate_tokens_per_s"], "NF4 base + adapter, qlorakit's decoder, 32 new tokens per row"),
        ("generation tokens/s, batch 16", r["generate_tokens_per_s_batch16"], "16 prompts decoded together"),
        ("held-out eval, two models x 60 rows, seconds", (r["eval_seconds"] or {}).get("batched"),
         f"one row at a time: {(r['eval_seconds'] or {}).get('one_row')} s; {r['eval_speedup']} x faster; "
         f"same predictions: {r['eval_same_predictions']}"),
    ]
    lines = ["| figure | value | notes |", "|---|---:|---|"]
    lines += [f"| {name} | {value} | {note} |" for name, value, note in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
