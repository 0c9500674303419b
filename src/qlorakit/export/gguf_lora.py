"""`qlorakit export RUN --format gguf-lora --out adapter.gguf`: a run's adapter as llama.cpp's GGUF LoRA.

llama.cpp (`llama-cli -m base.gguf --lora adapter.gguf`, llama-cpp-python's `lora_path`) and ollama
(`ADAPTER` in a Modelfile) apply it to the base GGUF at run time, with no merge. The file
(llama.cpp's `llama-adapter.cpp` reads it; its `convert_lora_to_gguf.py` writes the same):

    general.architecture   the base GGUF's (llama.cpp refuses any other)
    general.type           "adapter";  adapter.type "lora"
    adapter.lora.alpha     s · r, so that llama.cpp's scale alpha / r is the run's scale s
                           (alpha / r, or alpha / sqrt(r) with rsLoRA)
    <base>.lora_a          F32, numpy (r, in)  = ggml ne [in, r]
    <base>.lora_b          F32, numpy (out, r) = ggml ne [r, out], rows in the base tensor's own order

where <base> is the base tensor's GGUF name (`blk.0.attn_q.weight`); for llama-style models the
rows of attn_q/attn_k are permuted as llama.cpp's converter permutes the base (`permute_qk_rows`),
and A, acting on the input side, is not. llama.cpp computes y = W x + scale · B (A x).

A QA-LoRA adapter reads pooled input (A: (r, in / G)); as a plain LoRA its A is
repeat_interleave(A, G) · (in / G) / G, exactly the dense update qlorakit's merge folds
(adapters/qalora.py). Trained on the GGUF's own blocks, the adapter is exact for that file.

Beside it, `<adapter>.Modelfile` for ollama (`ollama create NAME -f adapter.Modelfile`): `FROM <base.gguf>`, `ADAPTER <adapter.gguf>`, and, when the run
gave a template-less base a chat format (data/chat_formats.py), that format as ollama's TEMPLATE
and its end-of-turn marker as a stop parameter; otherwise ollama reads the base GGUF's own template.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from qlorakit.files.atomic import check_output_file, staged_file, write_text_atomic
from qlorakit.models import gguf_io
from qlorakit.models.gguf_write import GGUFExportError, gguf_tensor_names

# ollama (Go template) spellings of qlorakit's chat formats, and their end-of-turn stop markers.
OLLAMA_TEMPLATES = {
    "chatml": ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n',
               "<|im_end|>"),
    "gemma": ('{{- $system := "" }}{{- range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}{{ end }}'
              '{{- $first := true }}{{- range .Messages }}{{- if eq .Role "user" }}<start_of_turn>user\n'
              '{{ if and $first $system }}{{ $system }}\n\n{{ end }}{{ .Content }}<end_of_turn>\n{{ $first = false }}'
              '{{- else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n{{ end }}'
              '{{- end }}<start_of_turn>model\n', "<end_of_turn>"),
}


def lora_factors(adapter_config: dict, tensors: dict[str, torch.Tensor],
                 shapes: dict[str, tuple[int, int]] | None = None) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """({module: (A' (r, in), B' (out, r))}, s) with s · B' A' each module's dense update, from a peft
    adapter (config and safetensors tensors); QA-LoRA's pooling is expanded into A'; VeRA is the
    rank-r LoRA A' = diag(λ_d) A[:, :in], B' = diag(λ_b) B[:out], s = 1 (`in`/`out` from `shapes`,
    module -> (in_features, out_features), which VeRA needs)."""
    from qlorakit.adapters.peft_format import PREFIX, VERA_PAIR

    if adapter_config.get("peft_type") == "VERA":
        if any(key not in tensors for key in VERA_PAIR):
            raise GGUFExportError("gguf-lora: the VeRA adapter file holds no projection pair (save_projection false); "
                                  "load it in qlorakit and save it again to write the pair")
        vera_a, vera_b = (tensors[key].float() for key in VERA_PAIR)
        factors = {}
        for key, lambda_b in tensors.items():
            if key.endswith(".vera_lambda_b"):
                module = key.removeprefix(PREFIX).removesuffix(".vera_lambda_b")
                lambda_d = tensors[f"{PREFIX}{module}.vera_lambda_d"].float()
                if module not in (shapes or {}):
                    raise GGUFExportError(f"gguf-lora: adapted layer {module} has no tensor in the base GGUF")
                in_features, out_features = shapes[module]
                factors[module] = (lambda_d[:, None] * vera_a[:, :in_features], lambda_b.float()[:, None] * vera_b[:out_features])
        return factors, 1.0

    if adapter_config.get("use_dora"):
        raise GGUFExportError("gguf-lora: a DoRA adapter rescales each row of the base weight, which llama.cpp's LoRA "
                              "adapters (y = W x + s·B A x) cannot express; merge the run (qlorakit merge RUN --out DIR) "
                              "and export the merged model")
    r, alpha = int(adapter_config["r"]), float(adapter_config["lora_alpha"])
    scale = alpha / math.sqrt(r) if adapter_config.get("use_rslora") else alpha / r
    group = adapter_config.get("qalora_group_size") if adapter_config.get("use_qalora") else None
    factors = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
        b = tensors[key.replace(".lora_A.", ".lora_B.")].float()  # (out, r)
        a = a.float()  # (r, in) or QA-LoRA (r, in / G)
        if group:
            n_groups = a.shape[1]
            a = a.repeat_interleave(group, dim=1) * (n_groups / group)  # (r, in): ΔW = s·(in/G)/G · B A[:, i // G]
        factors[module] = (a, b)
    return factors, scale


def export_gguf_lora(run_dir: str | os.PathLike, out_path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the adapter of `run_dir` (trained on a GGUF base) as llama.cpp's GGUF LoRA at `out_path`,
    and an ollama Modelfile beside it (`modelfile_path`); returns `out_path` (module docstring).

    Raises:
        OutputWriteError: `out_path` exists and `overwrite` is not set, or is a directory.
        GGUFExportError: the run's base is not a GGUF file, or an adapted layer has no tensor in it.
    """
    from gguf import GGUFWriter
    from safetensors.torch import load_file

    from qlorakit.adapters.peft_format import CHAT_TEMPLATE_NAME, WEIGHTS_NAME, read_adapter_config
    from qlorakit.data.chat_formats import CHAT_FORMATS
    from qlorakit.models.restore import check_run_dir
    from qlorakit.models.skeleton import load_config
    from qlorakit.models.sources import resolve_source

    run_dir, out_path = Path(run_dir), Path(out_path)
    check_output_file(out_path, overwrite)
    check_output_file(modelfile_path(out_path), overwrite)
    cfg = check_run_dir(run_dir)  # the adapter is complete; the run is not being written
    source = resolve_source(cfg.model.name)
    if source.kind != "gguf":
        raise GGUFExportError(f"{run_dir}: --format gguf-lora needs a run trained on a GGUF base (llama.cpp applies the "
                              f"adapter to that file); model.name {cfg.model.name!r} is a {source.kind}: merge and export instead")
    config = load_config(source)
    to_gguf = {hf: name for name, hf in gguf_tensor_names(config).items()}
    base_tensors = {t.name: t for t in gguf_io.tensor_index(source.location)}  # header only, cached
    shapes = {hf.removesuffix(".weight"): tuple(int(n) for n in base_tensors[name].shape[:2])  # ne0 = in first
              for hf, name in to_gguf.items() if name in base_tensors and len(base_tensors[name].shape) == 2}
    factors, scale = lora_factors(read_adapter_config(run_dir / "adapter"), load_file(run_dir / "adapter" / WEIGHTS_NAME), shapes)
    ranks = {a.shape[0] for a, _ in factors.values()}
    if len(ranks) != 1:
        raise GGUFExportError(f"{run_dir}: adapters of ranks {sorted(ranks)}; a GGUF LoRA has one rank")
    rank = ranks.pop()
    with staged_file(out_path) as tmp:
        writer = GGUFWriter(tmp, gguf_io.gguf_architecture(config.model_type))
        writer.add_type("adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", scale * rank)
        for module, (a, b) in sorted(factors.items()):
            name = to_gguf.get(f"{module}.weight")
            if name is None or name not in base_tensors:
                raise GGUFExportError(f"{run_dir}: adapted layer {module} has no tensor in {source.location}")
            in_features, out_features = (int(n) for n in base_tensors[name].shape)  # ne0 = in first
            if tuple(a.shape) != (rank, in_features) or tuple(b.shape) != (out_features, rank):
                raise GGUFExportError(f"{module}: adapter A {tuple(a.shape)} / B {tuple(b.shape)} do not fit {name} "
                                      f"({out_features}x{in_features})")
            heads = gguf_io.qk_heads(f"{module}.weight", config)
            if heads is not None:
                b = gguf_io.permute_qk_rows(b, heads)  # (out, r) in the base tensor's GGUF row order
            writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a.numpy(), dtype=np.float32))  # (r, in)
            writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b.numpy(), dtype=np.float32))  # (out, r)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    given = run_dir / "adapter" / CHAT_TEMPLATE_NAME
    chat_format = next((name for name, text in CHAT_FORMATS.items() if given.is_file() and given.read_text() == text), None)
    write_text_atomic(modelfile_path(out_path), modelfile(Path(source.location), out_path, chat_format))
    return out_path


def modelfile_path(adapter: Path) -> Path:
    """adapter.gguf -> adapter.Modelfile, beside it."""
    return Path(adapter).with_suffix(".Modelfile")


def modelfile(base: Path, adapter: Path, chat_format: str | None) -> str:
    """An ollama Modelfile applying `adapter` to `base` (absolute paths), with `chat_format`'s template."""
    lines = [f"FROM {base.resolve()}", f"ADAPTER {adapter.resolve()}"]
    if chat_format is not None:
        template, stop = OLLAMA_TEMPLATES[chat_format]
        lines += [f'TEMPLATE """{template}"""', f'PARAMETER stop "{stop}"']
    return "\n".join(lines) + "\n"
