"""Write a merged model as a plain Hugging Face directory, all or nothing.

    out_dir/  config.json  generation_config.json  model(-0000k-of-0000n).safetensors
              [model.safetensors.index.json]  tokenizer files + chat_template.jinja
              quantization.json  merge_report.json  (the `extra_files`)

Everything is written into a hidden sibling `.{name}.tmp-XXXX` and renamed into place at the
end, so an interrupted merge leaves no directory that looks complete (a leftover temporary
directory is hidden and named as such). Vanilla `AutoModelForCausalLM.from_pretrained(out_dir)`
and `AutoTokenizer.from_pretrained(out_dir)` load it without qlorakit.

dtype on reload: transformers 5.24's `from_pretrained` loads a model in one dtype, config.json's,
casting every tensor to it (its only per-module exception is a class's `_keep_in_fp32_modules`;
measured). So config.json records `reload_dtype(model)`: the weights' dtype when they share one,
and fp32 when the output head has its own (`merge_to_dense(lm_head_dtype=...)`): fp32 holds bf16
and fp16 values exactly, so a vanilla reload computes with every stored weight unchanged, at
fp32's memory; `from_pretrained(dir, dtype=torch.bfloat16)` trades the head's extra bits for half
of it. The files keep each tensor in its own dtype for readers that keep it (safetensors, GGUF).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from qlorakit.files.atomic import OutputWriteError, check_disk_space, check_output_dir, move_into_place, new_staging_dir
from qlorakit.models.skeleton import clean_config


MergeWriteError = OutputWriteError  # the merged model cannot be written (directory exists, not enough disk space)


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict, each shared (tied) tensor counted once."""
    seen: dict[int, int] = {}
    for tensor in model.state_dict().values():
        seen[tensor.untyped_storage().data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def reload_dtype(model: nn.Module) -> torch.dtype:
    """The one dtype in which transformers reloads every floating parameter of `model` exactly:
    theirs when they share one, else fp32 (which holds bf16 and fp16 values exactly)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


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
    return StagedWrite(model, tokenizer, out_dir, max_shard_size, overwrite).commit(extra_files or {})


class StagedWrite:
    """`save_merged` in two halves, so that the weights are written while the caller works on.

        StagedWrite(model, tokenizer, out)  checks `out` and the free space, then writes the
                                            weights and config.json into a hidden sibling
                                            `.{name}.tmp-XXXX` in a background thread
        .commit(extra_files)                waits for them, adds the tokenizer and `extra_files`,
                                            renames the directory to `out`; returns `out`
        .discard()                          waits for them and removes the temporary directory

    The thread only reads the model (`merge/run.py` runs the fidelity report meanwhile); the
    tokenizer is touched in the caller's thread only. Nothing appears at `out` before `commit`.
    """

    def __init__(self, model: nn.Module, tokenizer, out_dir: str | os.PathLike, max_shard_size: int | str = "2GB",
                 overwrite: bool = False):
        from concurrent.futures import ThreadPoolExecutor

        out = Path(out_dir)
        check_output_dir(out, overwrite)
        check_disk_space(out, int(state_dict_bytes(model) * 1.1), "the merged model")
        self.out, self.tokenizer = out, tokenizer
        self.staging = new_staging_dir(out)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qlorakit-write")
        self._weights = pool.submit(_write_model, model, self.staging, max_shard_size)
        pool.shutdown(wait=False)  # the thread ends with the write

    def commit(self, extra_files: dict[str, dict]) -> Path:
        try:
            for name in extra_files:
                if Path(name).name != name:
                    raise MergeWriteError(f"extra file {name!r}: give a plain file name, it is written inside {self.out}")
            _write_all(self._weights, self.tokenizer, self.staging, extra_files)
            move_into_place(self.staging, self.out)
        except BaseException:
            self.discard()
            raise
        return self.out

    def discard(self) -> None:
        self._weights.exception()  # wait: the thread may still be writing into the directory
        shutil.rmtree(self.staging, ignore_errors=True)


def _write_model(model: nn.Module, directory: Path, max_shard_size) -> None:
    """Weights, generation_config.json and a config.json without source attributes, whose dtype
    is `reload_dtype(model)` (save_pretrained records the first parameter's: a tied fp16 embedding
    of a bf16 merge would make transformers load the whole model as fp16)."""
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    config = clean_config(model.config)  # no quantization_config / GGUF attributes in config.json
    config.save_pretrained(directory)
    config_path = directory / "config.json"
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    saved["dtype"] = str(reload_dtype(model)).removeprefix("torch.")
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _stop_at_end_of_turn(path: Path, tokenizer) -> None:
    """Add the chat template's end-of-turn token to generation_config.json's eos_token_id, so that
    plain transformers' generate stops a reply where the trained model ends its turn."""
    from qlorakit.generation import stop_token_ids

    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    eos = config.get("eos_token_id")
    eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
    wanted = sorted(set(eos) | set(stop_token_ids(tokenizer)))
    if wanted != sorted(eos):
        config["eos_token_id"] = wanted
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_all(weights, tokenizer, directory: Path, extra_files: dict[str, dict]) -> None:
    """Complete the staging directory: the weights (`weights`, the writing thread's future), the
    tokenizer with its chat template, and the extra JSON files."""
    weights.result()  # re-raises what the writing thread raised
    tokenizer.save_pretrained(directory)
    _stop_at_end_of_turn(directory / "generation_config.json", tokenizer)
    for name, content in extra_files.items():
        (directory / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
