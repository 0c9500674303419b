"""Optional: EleutherAI lm-evaluation-harness tasks on any model qlorakit can restore.

    qlorakit eval RUN --lm-eval-tasks arc_easy,hellaswag

Needs the optional dependency (`pip install lm-eval`) and network access: the harness downloads
each task's data set from the Hugging Face Hub. The model is restored by models/restore.py (its
quantization and adapter included) and handed to the harness's HFLM wrapper as a live model, so
what is scored is exactly what `eval` and `chat` run. Metrics come back as "TASK/METRIC" keys
(e.g. "arc_easy/acc"), beside qlorakit's own in the results JSON.
"""

from __future__ import annotations

INSTALL_HINT = "--lm-eval-tasks needs lm-evaluation-harness: pip install lm-eval (task data is downloaded, so it needs network access)"


def _import_harness():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise RuntimeError(INSTALL_HINT) from None
    return lm_eval, HFLM


def run_lm_eval(model: str, tasks: str | list[str], batch_size: int = 1, limit: int | None = None, progress: bool = True) -> dict[str, float]:
    """{"TASK/METRIC": value} of the harness's tasks on `model` (stderr entries dropped)."""
    lm_eval, HFLM = _import_harness()
    from qlorakit.models.restore import load_any
    from qlorakit.quant.linear import cached_dense_weights

    names = [t.strip() for t in tasks.split(",") if t.strip()] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise ValueError("--lm-eval-tasks: give at least one task name, e.g. arc_easy")
    loaded = load_any(model, progress=progress)
    with cached_dense_weights(loaded.model):
        lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
        output = lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit)
    scores = {}
    for task, values in (output or {}).get("results", {}).items():
        for key, value in values.items():
            metric = key.split(",", 1)[0]  # "acc,none" -> "acc"
            if isinstance(value, (int, float)) and not metric.endswith("_stderr"):
                scores[f"{task}/{metric}"] = float(value)
    return scores
