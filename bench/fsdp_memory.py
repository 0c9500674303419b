"""Per-rank peak memory of FSDP training against one process, and what `qlorakit plan` predicts.

    python bench/fsdp_memory.py [--model gemma3-270m] [--quant gguf] [--batch 1] [--max-length 64] [--steps 3] [--out FILE]

One config (LoRA r=16 on every linear layer, fp32, rows of --max-length tokens; quant.method
gguf keeps the model's own GGUF blocks, nf4 quantizes a dense checkpoint) trained three ways, each process measured by bench/rank_peak.py
(getrusage ru_maxrss: the whole process, loading included):

    one process       batch 2B (the global batch of the ranks)
    2 ranks, ddp      batch B per rank: the whole model on each
    2 ranks, fsdp     batch B per rank: the decoder layers sharded

--model tiny-wide-hf (with --quant nf4): the same architecture as a dense fp32 safetensors directory
(1.5 GiB, SmolLM2's tokenizer, tied embeddings): FSDP-QLoRA from a dense checkpoint, whose nf4
codes every rank maps from qlorakit's quantized cache (written by the warm-up run).

--model tiny-wide: a random Llama GGUF written here, 24 layers of hidden 1024 / intermediate 4096 in
Q4_K and a 1,024-token vocabulary: the quantized weights (226 MiB) dominate, as they do in a large
model, where Gemma 3 270M's are 65 MiB next to its 262,144-row embeddings.

The FSDP rank's saving is read against the DDP rank (same micro-batch, same activations); against
one process it also counts the halved micro-batch.

every process with OMP_NUM_THREADS=1 (torchrun's default for its ranks),
after one unmeasured warm-up run (a GGUF's first load builds qlorakit's metadata cache), and
`qlorakit plan` for each (--processes 2, with --fsdp for the last). The issue's bar: each
FSDP rank below one process by at least a third of the quantized weights, and the plan within 15%.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.plan_accuracy import _env, write_text_data  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(model: str, quant: str, data: Path, out: Path, batch_size: int, max_length: int, steps: int, distributed: str) -> dict:
    return {
        "model": {"name": model, "dtype": "fp32"},
        "quant": {"method": quant},
        "adapter": {"r": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear"},
        "data": {"path": str(data), "max_length": max_length},
        "train": {"output_dir": str(out), "max_steps": steps, "batch_size": batch_size, "save_every": None,
                  "warmup_ratio": 0.0, "distributed": distributed},
    }


TINY_WIDE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=16, max_position_embeddings=256)


def write_tiny_wide(path: Path) -> Path:
    """The tiny-wide GGUF (module docstring): Q4_K decoder layers, F32 embeddings and norms."""
    from qlorakit.models.embedded import smollm2_gguf_path
    from tests.gguf_tiny import build, tiny_config, write_tiny_gguf

    types = lambda name, shape: "Q4_K" if name.startswith("blk.") else "F32"  # noqa: E731
    return write_tiny_gguf(build(tiny_config("llama", **TINY_WIDE)), path, smollm2_gguf_path(), types)


def write_tiny_wide_hf(path: Path) -> Path:
    """The tiny-wide architecture as a dense fp32 safetensors directory (module docstring)."""
    from qlorakit.models.load import load_tokenizer
    from tests.conftest import save_tiny_llama

    return save_tiny_llama(path, load_tokenizer("smollm2"), tie_word_embeddings=True, **TINY_WIDE)


def _measure(config_path: Path, ranks: int, peaks_dir: Path) -> list[int]:
    peaks_dir.mkdir(parents=True, exist_ok=True)
    probe = [str(ROOT / "bench" / "rank_peak.py"), str(peaks_dir), "train", str(config_path),
             "--overwrite", "--no-progress"]
    if ranks == 1:
        command = [sys.executable, *probe]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
                   "127.0.0.1", "--master_port", str(_free_port()), *probe]
    # torchrun gives each rank OMP_NUM_THREADS=1; the one process gets the same, so that the rows differ by
    # the sharding alone (with 2 threads, per-thread heaps add up to 1.3 GiB to the tiny-wide peak here).
    out = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=_env(OMP_NUM_THREADS="1"), cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{' '.join(command)} failed: {out.stderr[-3000:]}")
    return [json.loads((peaks_dir / f"rank-{r}.json").read_text())["peak_bytes"] for r in range(ranks)]


def _plan(config_path: Path, processes: int, fsdp: bool) -> dict:
    command = [sys.executable, "-m", "qlorakit", "plan", str(config_path), "--json", "--processes", str(processes)]
    out = subprocess.run(command + (["--fsdp"] if fsdp else []), capture_output=True, text=True, timeout=300, env=_env())
    if out.returncode:
        raise RuntimeError(f"qlorakit plan failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--quant", default="gguf", choices=["gguf", "nf4", "int4"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="rows per rank")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "fsdp_memory.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fsdp-memory-"))
    data = write_text_data(work / "text.jsonl")
    model = {"tiny-wide": lambda: str(write_tiny_wide(work / "tiny-wide.gguf")),
             "tiny-wide-hf": lambda: str(write_tiny_wide_hf(work / "tiny-wide-hf"))}.get(args.model, lambda: args.model)()
    rows = []
    b = args.batch
    # once, unmeasured: a model's first load builds the GGUF metadata cache, or the quantized cache
    warm = work / "warm-up.yaml"
    warm.write_text(yaml.safe_dump(_config(model, args.quant, data, work / "runs" / "warm-up", b, args.max_length, 1, "ddp"), sort_keys=False))
    _measure(warm, 1, work / "peaks" / "warm-up")
    for name, ranks, batch, distributed in (("one process", 1, 2 * b, "ddp"), ("2 ranks ddp", 2, b, "ddp"),
                                            ("2 ranks fsdp", 2, b, "fsdp")):
        path = work / f"{name.replace(' ', '-')}.yaml"
        path.write_text(yaml.safe_dump(_config(model, args.quant, data, work / "runs" / name.replace(" ", "-"), batch,
                                               args.max_length, args.steps, distributed), sort_keys=False))
        plan = _plan(path, ranks, distributed == "fsdp")
        peaks = _measure(path, ranks, work / "peaks" / name.replace(" ", "-"))
        rows.append({"run": name, "ranks": ranks, "batch_per_rank": batch, "peak_mib_per_rank": [round(p / 2**20, 1) for p in peaks],
                     "planned_mib": round(plan["peak_bytes"] / 2**20, 1),
                     "planned_load_mib": round(plan["load_bytes"] / 2**20, 1),
                     "planned_train_mib": round(plan["train_bytes"] / 2**20, 1),
                     "plan_error_percent": round(100 * (plan["peak_bytes"] - max(peaks)) / max(peaks), 1),
                     "quantized_weights_mib": round(sum(plan["weights_by_format"].values()) / 2**20, 1)})
        print(json.dumps(rows[-1]), flush=True)
    single, ddp, fsdp = (max(row["peak_mib_per_rank"]) for row in rows)
    quantized = rows[0]["quantized_weights_mib"]
    command = f"python bench/fsdp_memory.py --model {args.model} --quant {args.quant} --batch {b} --max-length {args.max_length} --steps {args.steps}"
    summary = {"model": args.model, "quant": args.quant, "batch_per_rank": b, "max_length": args.max_length, "steps": args.steps, "rows": rows,
               "fsdp_saving_against_ddp_mib": round(ddp - fsdp, 1), "fsdp_saving_against_one_process_mib": round(single - fsdp, 1),
               "third_of_quantized_weights_mib": round(quantized / 3, 1), "command": command}
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(f"largest rank: one process {single:.1f} MiB, DDP {ddp:.1f} MiB, FSDP {fsdp:.1f} MiB: FSDP {ddp - fsdp:.1f} MiB "
          f"below DDP, {single - fsdp:.1f} MiB below one process (a third of the quantized weights: {quantized / 3:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
