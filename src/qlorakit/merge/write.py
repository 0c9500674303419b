"""Write a merged model as a plain Hugging Face directory, all or nothing.

    out_dir/  config.json  generation_config.json  model(-0000k-of-0000n).safetensors
              [model.safetensors.index.json]  tokenizer files + chat_template.jinja
              quantization.json  merge_report.json  (the `extra_files`)

Everything is written into a hidden sibling `.{name}.tmp-XXXX` and renamed into place at the
end, so an interrupted merge leaves no directory that looks complete (a leftover temporary
directory is hidden and named as such). Vanilla `AutoModelForCausalLM.from_pretrained(out_dir)`
and `AutoTokenizer.from_pretrained(out_dir)` load it without qlorakit.

dtype on reload: config.json records the dtype most of the weights have. transformers 5.23's
`from_pretrained` casts every tensor to that dtype (measured), so an fp16 head kept by
`merge_to_dense(keep_lm_head_fp16=True)` is stored as fp16 in the file but comes back bf16 in
vanilla transformers; readers that keep per-tensor dtypes (safetensors, GGUF converters) see fp16.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from qlorakit.merge.fold import clean_config


class MergeWriteError(OSError):
    """The merged model cannot be written (directory exists, not enough disk space)."""


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict, each shared (tied) tensor counted once."""
    seen: dict[int, int] = {}
    for tensor in model.state_dict().values():
        seen[tensor.untyped_storage().data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def main_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype holding the most parameters (the model's dtype, whatever the head's)."""
    counts: Counter = Counter()
    for parameter in model.parameters():  # tied parameters are yielded once
        if parameter.is_floating_point():
            counts[parameter.dtype] += parameter.numel()
    return counts.most_common(1)[0][0]


def _format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_disk_space(out_dir: Path, needed: int) -> None:
    """Raise MergeWriteError if the file system of `out_dir` has less than `needed` bytes free."""
    where = _existing_ancestor(out_dir.parent)
    free = shutil.disk_usage(where).free
    if free < needed:
        raise MergeWriteError(
            f"{out_dir}: not enough disk space: the merged model needs about {_format_bytes(needed)}, "
            f"{where} has {_format_bytes(free)} free"
        )


def save_merged(
    model: nn.Module,
    tokenizer,
    out_dir: str | os.PathLike,
    max_shard_size: int | str = "2GB",
    extra_files: dict[str, dict] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` (a plain transformers model, e.g. from `merge_to_dense`) and `tokenizer`.

    Args:
        model: the merged model; left unchanged apart from what save_pretrained records on it.
        tokenizer: saved with its chat template.
        out_dir: the directory to create.
        max_shard_size: safetensors shard size ("2GB", or bytes).
        extra_files: file name -> JSON object written beside the model (quantization.json,
            merge_report.json).
        overwrite: replace an existing non-empty `out_dir` (only once the new one is complete).

    Returns:
        The directory written.

    Raises:
        MergeWriteError: `out_dir` is a file, or exists and is not empty (without overwrite), or
            its file system has less free space than the state dict's size + 10%.
    """
    out = Path(out_dir)
    for name in extra_files or {}:
        if Path(name).name != name:
            raise MergeWriteError(f"extra file {name!r}: give a plain file name, it is written inside {out}")
    if out.exists() and not out.is_dir():
        raise MergeWriteError(f"{out}: exists and is a file; choose another output directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MergeWriteError(f"{out}: exists and is not empty; choose another --out or pass --overwrite")
    check_disk_space(out, int(state_dict_bytes(model) * 1.1))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        _write_all(model, tokenizer, staging, max_shard_size, extra_files or {})
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _write_all(model: nn.Module, tokenizer, directory: Path, max_shard_size, extra_files: dict[str, dict]) -> None:
    dtype = main_dtype(model)
    original_config = model.config
    model.config = clean_config(original_config)  # no quantization_config / GGUF attributes in config.json
    try:
        model.save_pretrained(directory, max_shard_size=max_shard_size)
    finally:
        model.config = original_config
    # save_pretrained records the dtype of the first parameter; a tied fp16 embedding (fp16
    # head kept in a bf16 merge) would make transformers load the whole model as fp16.
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["dtype"] = str(dtype).removeprefix("torch.")
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tokenizer.save_pretrained(directory)
    for name, content in extra_files.items():
        (directory / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished directory to `out`; an old `out` is removed only after that."""
    if not out.exists():
        os.replace(staging, out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        os.replace(staging, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.replace(out, old / out.name)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)
