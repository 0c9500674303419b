"""Benchmark inputs: token rows and a 16-bit Hugging Face copy of the embedded SmolLM2.

    python bench/data.py prepare      # once, in its own process: writes the HF copy (not timed)

Fixed-length rows are plain text longer than the sequence length, so every row is truncated to
exactly `seq_len` tokens. Variable-length rows imitate instruction data: lengths drawn from a
log-normal with a median of 60 tokens (many short rows, a few long ones, capped at `seq_len`),
four times as many tokens as the steps consume: packing chooses from a dataset larger than one
run, as it does on real data (with exactly the steps' tokens the last bins are part-empty).
Both are seeded, so every process and every run sees the same rows.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

WORDS = ("the a of to and in is was for on that with as by at from it an be this which or are were has have "
         "model data train time learning weight layer token adapter merge memory group block value number "
         "question answer river city music history science language north winter light paper system").split()
VARLEN_OVERSUPPLY = 4


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def row_lengths(count: int, seq_len: int, seed: int = 0) -> list[int]:
    """Approximate token counts of instruction-like rows: lognormal(median 60, sigma 0.9), in [8, seq_len]."""
    rng = random.Random(seed)
    return [max(8, min(seq_len, int(rng.lognormvariate(4.1, 0.9)))) for _ in range(count)]


def write_rows(path: Path, *, varlen: bool, seq_len: int, count: int, seed: int = 0) -> Path:
    """A JSONL file of {"text": ...} rows: `count` rows of at least seq_len tokens, or, with
    varlen, enough instruction-like rows to fill about 4 · `count` packed sequences of seq_len."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if varlen:
        lengths, budget = [], VARLEN_OVERSUPPLY * count * seq_len
        for n in row_lengths(10 * VARLEN_OVERSUPPLY * count + 100, seq_len, seed):
            if budget <= 0:
                break
            lengths.append(n)
            budget -= n
        rows = [_text(rng, max(1, n - 2)) for n in lengths]
    else:
        rows = [_text(rng, 2 * seq_len) for _ in range(count)]
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("QLORAKIT_CACHE", Path.home() / ".cache" / "qlorakit")) / "bench"


def hf_copy_of_smollm2() -> Path:
    """A bf16 safetensors Hugging Face directory of the embedded GGUF (written by `prepare`)."""
    path = cache_dir() / "smollm2-bf16"
    if not (path / "config.json").exists():
        raise SystemExit(f"{path} is missing: run `python bench/data.py prepare` first")
    return path


def prepare() -> Path:
    """Write the HF copy: the GGUF dequantized to bf16 (transformers order), saved with its tokenizer."""
    from qlorakit.models.load import load_model

    path = cache_dir() / "smollm2-bf16"
    if (path / "config.json").exists():
        return path
    loaded = load_model("smollm2", dtype="bf16", quant="none", progress=False)
    tmp = path.with_name(path.name + ".tmp")
    loaded.model.save_pretrained(tmp)
    loaded.tokenizer.save_pretrained(tmp)
    tmp.rename(path)
    return path


def token_batches(batch: int, seq_len: int, count: int):
    """`count` (batch, seq_len) int64 tensors: the fixed-length rows, tokenized by the copy's tokenizer."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_copy_of_smollm2())
    rng = random.Random(0)
    rows = [_text(rng, 2 * seq_len) for _ in range(batch * count)]
    ids = [tokenizer(r, add_special_tokens=False)["input_ids"][:seq_len] for r in rows]
    tensor = torch.tensor(ids, dtype=torch.long)  # (count * batch, seq_len)
    return list(tensor.split(batch))  # count x (batch, seq_len)


if __name__ == "__main__":
    if sys.argv[1:] == ["prepare"]:
        print(prepare())
    else:
        raise SystemExit("usage: python bench/data.py prepare")
