"""Timed single jobs, each in its own process; prints one JSON line.

    python bench/tasks.py load [--cold]     seconds until the embedded SmolLM2 is NF4 + LoRA, ready to train
    python bench/tasks.py generate RUN      greedy generation tokens/s of a trained run (adapter on, NF4 base),
                                            qlorakit's decoder (generation.py) at batch 1 and batch 16
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_seconds(cold: bool) -> dict:
    """Import-to-ready time: load + NF4 + adapters. --cold starts from an empty qlorakit cache.

    Also split: `import_seconds` for torch, the transformers modules a Llama needs and
    bitsandbytes (imported here first: load_model imports the former, and the nf4 layers' first
    forward the latter, 1.6 s here), `after_import_seconds` for qlorakit's work.
    """
    if cold:
        with tempfile.TemporaryDirectory(prefix="qlk-cold-cache-") as cache:
            os.environ["QLORAKIT_CACHE"] = cache
            return _load_seconds(cold)
    return _load_seconds(cold)


def _load_seconds(cold: bool) -> dict:
    start = time.perf_counter()
    import torch  # noqa: F401
    import bitsandbytes.functional  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from qlorakit.adapters.inject import add_adapters
    from qlorakit.models.load import load_model

    imported = time.perf_counter()
    loaded = load_model("smollm2", dtype="fp32", quant="nf4", progress=False)
    add_adapters(loaded.model, TARGETS, r=16, alpha=32, dropout=0.05)
    ready = time.perf_counter()
    return {"seconds": ready - start, "import_seconds": imported - start, "after_import_seconds": ready - imported,
            "cold": cold}


def generate_tokens_per_s(run_dir: str, new_tokens: int = 32) -> dict:
    """New tokens per second of `generation.generate_ids`, every row made to run `new_tokens` tokens
    (no stop token): 4 prompts one at a time (batch 1), then 16 prompts as one batch."""
    from qlorakit.generation import chat_prompt_ids, generate_ids, pad_token_id, user_turn
    from qlorakit.models.restore import load_run
    from qlorakit.quant.linear import cached_dense_weights

    loaded, _ = load_run(run_dir, progress=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    topics = ["a river", "the moon", "a city at night", "an old library", "the sea", "a mountain village", "winter",
              "a train journey", "a garden", "a storm", "the desert", "a lighthouse", "a forest", "a market", "snow", "bees"]
    prompts = [chat_prompt_ids(tokenizer, user_turn(f"Write a long story about {t}.")) for t in topics]
    result = {"new_tokens_per_row": new_tokens}
    with cached_dense_weights(model):
        generate_ids(model, prompts[:2], 4, [], pad_token_id(tokenizer), batch_size=2)  # warm-up
        for batch, rows in ((1, 4), (16, 16)):
            start = time.perf_counter()
            out = generate_ids(model, prompts[:rows], new_tokens, [], pad_token_id(tokenizer), batch_size=batch)
            seconds = time.perf_counter() - start
            result[f"batch{batch}_tokens_per_s"] = sum(len(t) for t in out) / seconds
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    job, rest = sys.argv[1], sys.argv[2:]
    result = load_seconds("--cold" in rest) if job == "load" else generate_tokens_per_s(rest[0])
    print(json.dumps(result))
