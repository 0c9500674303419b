"""Optional: EleutherAI lm-evaluation-harness tasks on any model qlorakit can restore.

    qlorakit eval RUN --lm-eval-tasks arc_easy,hellaswag        registered tasks (their data from the Hub)
    qlorakit eval RUN --lm-eval-tasks tasks/capitals.yaml       a task of your own over local files (offline)

Needs the extra: `pip install 'qlorakit[lm-eval]'`. The model is restored by models/restore.py
(its quantization, GGUF blocks and adapter included) and handed to the harness's HFLM wrapper as
a live model, so what is scored is exactly what `eval` and `chat` run. Metrics come back as
"TASK/METRIC" keys (e.g. "arc_easy/acc"), beside qlorakit's own in the results JSON.

A task YAML is read with the harness's own loader (as `lm_eval --tasks FILE.yaml` does); relative
paths in its `dataset_kwargs.data_files` are taken from the YAML's folder, not the working
directory, and must exist. With `dataset_path: json` (or csv, parquet) nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

INSTALL_HINT = "--lm-eval-tasks needs lm-evaluation-harness: pip install 'qlorakit[lm-eval]' (registered tasks " \
               "download their data, so they need network access; a task YAML over local files does not)"


def _import_harness():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise RuntimeError(INSTALL_HINT) from None
    return lm_eval, HFLM


def _resolve_data_files(value, folder: Path, yaml_path: Path):
    """data_files (a path, a list of paths, or {split: path or list}) with relative paths taken
    from `folder`; a file that does not exist is an error naming the YAML and the file."""
    if isinstance(value, dict):
        return {split: _resolve_data_files(v, folder, yaml_path) for split, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_resolve_data_files(v, folder, yaml_path) for v in value]
    path = Path(value).expanduser()
    path = path if path.is_absolute() else folder / path
    if not path.is_file():
        raise FileNotFoundError(f"--lm-eval-tasks {yaml_path}: dataset_kwargs.data_files {value}: no such file ({path})")
    return str(path)


def task_config(path: str | Path) -> dict:
    """A task YAML as the harness's config dict, its local data files resolved (module docstring)."""
    from lm_eval.tasks._yaml_loader import load_yaml  # the loader `lm_eval --tasks FILE.yaml` uses

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--lm-eval-tasks {path}: no such task YAML")
    try:
        config = load_yaml(path, resolve_func=True)
    except Exception as error:  # yaml.YAMLError, the loader's ValueError for a non-mapping, a bad !function
        raise ValueError(f"--lm-eval-tasks {path}: not a task YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(config, dict) or "task" not in config:
        raise ValueError(f"--lm-eval-tasks {path}: not a task YAML (a mapping with a `task:` name)")
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if files is not None:
        config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": _resolve_data_files(files, path.parent, path)}
    return config


def task_list(tasks: str | list[str]) -> list[str | dict]:
    """--lm-eval-tasks as the harness takes it: task names as they are, *.yaml paths as configs."""
    names = [t.strip() for t in tasks.split(",") if t.strip()] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise ValueError("--lm-eval-tasks: give at least one task name (e.g. arc_easy) or task YAML")
    return [task_config(t) if str(t).endswith((".yaml", ".yml")) else t for t in names]


def run_lm_eval(model: str, tasks: str | list[str], batch_size: int = 8, limit: int | None = None, progress: bool = True) -> dict[str, float]:
    """{"TASK/METRIC": value} of the harness's tasks on `model` (stderr entries dropped)."""
    lm_eval, HFLM = _import_harness()
    from qlorakit.models.restore import load_any
    from qlorakit.quant.linear import cached_dense_weights

    specs = task_list(tasks)  # task files checked before the model loads
    loaded = load_any(model, progress=progress)
    with cached_dense_weights(loaded.model):
        lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
        output = lm_eval.simple_evaluate(model=lm, tasks=specs, limit=limit)
    scores = {}
    for task, values in (output or {}).get("results", {}).items():
        for key, value in values.items():
            metric = key.split(",", 1)[0]  # "acc,none" -> "acc"
            if isinstance(value, (int, float)) and not metric.endswith("_stderr"):
                scores[f"{task}/{metric}"] = float(value)
    return scores
