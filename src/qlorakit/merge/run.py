"""`qlorakit merge RUN_DIR --out DIR|FILE.gguf`: merge a training run and prove the merge is faithful.

    adapter model = the run's quantized base + adapter (restored from config.yaml)
    merged        = dequantize + fold in fp32 + cast            (merge/fold.py)
    fidelity      = adapter model vs merged on the probe set, the adapter model computing at the
                    merged model's precision (merge/fidelity.py, models/precision.py)
    refuse to write when greedy agreement < min_agreement, unless forced
    write         = HF directory + quantization.json + merge_report.json, atomically (merge/write.py)
    --requantize  = also measure what peft's re-quantizing merge would have kept (report only)

QA-LoRA runs whose base has per-group mins merge exactly instead (merge/zero_point.py):

    W₀ + ΔW = d · q + (m + offset)     only the mins change; codes and scales stay byte for byte

    quant.method gguf, --out FILE.gguf  the source GGUF rewritten with the folded tensors (same size,
                                        same format, export/gguf.py), with FILE.quantization.json and
                                        FILE.merge_report.json beside it (FILE = the name without .gguf)
    quant.method int4, --out DIR        an int4 directory (models/quantized_dir.py) that
                                        `qlorakit.models.restore.load_any` loads back
A `.gguf` --out for anything else (plain LoRA, a base that is not GGUF) is refused: merge to a
16-bit directory, then `qlorakit export DIR --format gguf`.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from qlorakit import metadata
from qlorakit.dtypes import dtype_name, matmul_is_native, to_torch_dtype
from qlorakit.merge.fidelity import FidelityReport, check_faithful, fidelity_report, probe_set, run_probes
from qlorakit.merge.fold import MergeError, merge_to_dense
from qlorakit.models.precision import computing_in
from qlorakit.quant.linear import cached_dense_weights
from qlorakit.quant.replace import heads_are_tied


@dataclass(frozen=True)
class HeadChoice:
    """The output head's dtype in a 16-bit merge ("same": the merge dtype's) and whether a head
    tied to the input embeddings is written as a tensor of its own (merge.lm_head_dtype,
    merge.untie_embeddings)."""

    dtype: str = "same"
    untie_embeddings: bool = False

    def dtype_in(self, merge_dtype: str) -> str:
        return merge_dtype if self.dtype == "same" else self.dtype


@dataclass
class MergeResult:
    out_dir: Path | None
    fidelity: FidelityReport
    requantized_fidelity: FidelityReport | None
    survival: dict | None
    requantized_survival: dict | None
    report: dict
    seconds: float
    merged_model: object = None
    requantized_model: object = None  # the `requantize` model, when asked for


def training_prompts(data_path: str, limit: int = 8) -> list[str]:
    """The questions (`last_user_text` of `prompt_and_answer`) of the first `limit` training rows, for the probe set."""
    from qlorakit.data.formats import resolve_format, validate_rows
    from qlorakit.data.read import read_rows
    from qlorakit.data.templates import last_user_text, prompt_and_answer

    try:
        table = read_rows(data_path)
        rows = validate_rows(table, resolve_format(table, "auto"))
    except (ValueError, OSError):
        return []  # the data moved or changed since training: probe with the generic prompts only
    pairs = (prompt_and_answer(row) for row in rows[:limit])
    prompts = (last_user_text(pair[0]) for pair in pairs if pair is not None)
    return [prompt for prompt in prompts if prompt]


def original_weights_of(source) -> dict[str, torch.Tensor]:
    """The source's own 16-bit weights, for `--into original` (HF directories only)."""
    if source.kind != "hf_dir":
        raise MergeError(
            f"merge --into original: {source.spec} has no original 16-bit weights "
            f"({'a GGUF file holds only its quantized tensors' if source.kind == 'gguf' else source.kind}); use --into dequantized"
        )
    from safetensors.torch import load_file

    state = {}
    for path in sorted(Path(source.location).glob("*.safetensors")):
        state.update(load_file(str(path)))
    return state


AUTO_DTYPES = ("bf16", "fp16", "fp32")
"""`dtype="auto"` tries these in order and keeps the first whose merge is faithful: the 16-bit
dtypes first (half the size of fp32), bf16 before fp16 (its range holds any weight; fp16's 10
mantissa bits keep more of a small update), fp32 last (the fold's own precision)."""


def candidate_dtypes(dtype: str) -> tuple[str, ...]:
    """The merge dtypes `merge_loaded` tries for `dtype` (one name, or "auto": AUTO_DTYPES)."""
    return AUTO_DTYPES if dtype == "auto" else (dtype,)


def merge_loaded(
    loaded,
    cfg,
    out: str | Path | None,
    *,
    dtype: str = "auto",
    into: str = "dequantized",
    lm_head_dtype: str = "same",
    untie_embeddings: bool = False,
    requantize: str | None = None,
    force: bool = False,
    overwrite: bool = False,
    min_agreement: float = 0.99,
    spec: dict | None = None,
    keep_quantized: bool = True,
) -> MergeResult:
    """Merge an adapter model already in memory (what `qlorakit train` and `demo` hold).

    `out` ending in .gguf, or an int4 QA-LoRA run with `keep_quantized` and `into` "dequantized",
    take the exact fold (`merge_exact`; `dtype`, `lm_head_dtype` and `untie_embeddings` do not
    apply there, and are refused when set); everything else is the 16-bit merge, in `dtype` or,
    for "auto", in the first of `candidate_dtypes` whose merge passes the fidelity check, with the
    output head in `lm_head_dtype` ("same": the merge dtype; see `merge_to_dense`).
    merge_report.json lists every dtype tried with its agreement (`dtype_choice`). `force` writes
    the last candidate even when it is not faithful.

    Raises:
        UnfaithfulMergeError: no candidate dtype gives a faithful merge (and not `force`).
    """
    exact = exact_merge_format(cfg, out, into, requantize, keep_quantized)
    if exact is not None:
        if lm_head_dtype != "same" or untie_embeddings:
            asked = f"lm_head_dtype {lm_head_dtype}" if lm_head_dtype != "same" else "untie_embeddings"
            raise MergeError(f"merge {asked}: this {exact} merge is exact and keeps every tensor's format and dtype "
                             f"(the head included); merge to a 16-bit directory to choose the head's dtype")
        return merge_exact(loaded, cfg, out, exact, force=force, overwrite=overwrite, min_agreement=min_agreement, spec=spec)
    started = time.perf_counter()
    candidates = candidate_dtypes(dtype)
    head = HeadChoice(lm_head_dtype, untie_embeddings)
    tried: list[dict] = []
    for candidate in candidates:
        last = candidate == candidates[-1]
        result = _merge_dense(loaded, cfg, out, candidate, into, head, requantize, force and last,
                              overwrite, min_agreement, spec, tried, requested=dtype, last=last)
        if result is not None:
            result.seconds = time.perf_counter() - started
            return result
    raise AssertionError("unreachable: the last candidate dtype returns or raises")


def _merge_dense(loaded, cfg, out, dtype: str, into: str, head: HeadChoice, requantize: str | None,
                 force: bool, overwrite: bool, min_agreement: float, spec: dict | None, tried: list[dict],
                 requested: str, last: bool) -> MergeResult | None:
    """One 16-bit merge in `dtype`. Unfaithful and not `last`: records the try in `tried`, writes
    nothing and returns None (the caller tries the next dtype); unfaithful and `last`: raises
    unless `force`."""
    from qlorakit.merge.write import StagedWrite

    adapter_model, tokenizer = loaded.model, loaded.tokenizer
    original = original_weights_of(loaded.source) if into == "original" else None
    merged = merge_to_dense(adapter_model, to_torch_dtype(dtype), to_torch_dtype(head.dtype_in(dtype)), original,
                            head.untie_embeddings)
    # The weights are written into a hidden directory while the fidelity report runs; it becomes
    # `out` only if the merge is faithful (or forced), and is removed otherwise.
    staged = StagedWrite(merged, tokenizer, out, overwrite=overwrite) if out is not None else None
    try:
        report, fidelity, rq_fidelity, survival, rq_survival, requantized = _check_merge(
            adapter_model, merged, tokenizer, cfg, dtype, into, head, requantize, min_agreement, original)
        tried.append({"dtype": dtype, "greedy_token_agreement": fidelity.greedy_token_agreement,
                      "faithful": report["faithful"]})
        report["dtype_choice"] = {"requested": requested, "tried": list(tried)}
        if not report["faithful"] and not last:
            if staged is not None:
                staged.discard()
            return None
        if not report["faithful"] and not force:
            _refuse_unfaithful(fidelity, min_agreement, survival, tried)
        out_dir = None
        if staged is not None:
            spec = spec or metadata.build_spec(cfg, loaded.source.name, Path(cfg.data.path).stem, loaded.source.location)
            files = {"quantization.json": metadata.merged_spec(spec, dtype, into, report["lm_head_dtype"]),
                     "merge_report.json": report}
            out_dir = staged.commit(files)
    except BaseException:
        if staged is not None:
            staged.discard()
        raise
    return MergeResult(out_dir, fidelity, rq_fidelity, survival, rq_survival, report, 0.0, merged, requantized)


def _refuse_unfaithful(fidelity: FidelityReport, min_agreement: float, survival: dict, tried: list[dict]) -> None:
    """Raise the fidelity check's error, saying what each dtype tried kept."""
    try:
        check_faithful(fidelity, min_agreement)
    except ValueError as error:
        last = tried[-1]["dtype"]
        if len(tried) > 1:
            each = ", ".join(f"{t['dtype']} {t['greedy_token_agreement']:.4f}" for t in tried)
            raise type(error)(f"{error} (agreement by merge dtype: {each})") from None
        if last != "fp32":
            raise type(error)(f"{error} (casting the merged weights to {last} kept {survival['kept']:.3f} of the "
                              f"update with noise {survival['noise']:.3f}; --dtype fp32 or --dtype auto keeps it whole)") from None
        raise


def _check_merge(adapter_model, merged, tokenizer, cfg, dtype: str, into: str, head: HeadChoice,
                 requantize: str | None, min_agreement: float, original):
    """The fidelity report and update survival of a 16-bit merge (and of its re-quantized twin).
    Returns (report, fidelity, rq_fidelity, survival, rq_survival, requantized model); the
    report's "faithful" says whether the merge passes (the caller decides what follows)."""
    from qlorakit.merge.requantize import requantize_like_peft
    from qlorakit.merge.survival import update_survivals

    tied_before = heads_are_tied(adapter_model)
    prompts = probe_set(training_prompts(cfg.data.path))
    # Both models compute at one precision, so that the report measures the merge, not the gap
    # between bf16 and fp32 arithmetic (models/precision.py): the merged model's own, or fp32 where
    # the device only emulates it (a 16-bit probe run would take minutes there); the merged
    # weights are the rounded ones either way. A head in a dtype of its own makes transformers
    # reload the model in fp32 (merge/write.py), so such a merge is checked in fp32, as it is served.
    from qlorakit.merge.write import reload_dtype

    reloads_as = dtype_name(reload_dtype(merged))
    native = matmul_is_native(dtype, next(merged.parameters()).device)
    arithmetic = dtype if native and reloads_as == dtype else "fp32"
    with computing_in(adapter_model, to_torch_dtype(arithmetic)), cached_dense_weights(adapter_model):
        reference = run_probes(adapter_model, tokenizer, prompts)
    with computing_in(merged, to_torch_dtype(arithmetic)):
        fidelity = fidelity_report(adapter_model, merged, tokenizer, prompts, reference=reference)
    rq_fidelity = rq_survival = requantized = None
    if requantize:
        requantized = requantize_like_peft(merged, requantize, compute_dtype=to_torch_dtype(arithmetic))
        with cached_dense_weights(requantized):
            rq_fidelity = fidelity_report(adapter_model, requantized, tokenizer, prompts, reference=reference)
    survivals = update_survivals(adapter_model, [merged] + ([requantized] if requantize else []), original)
    survival = survivals[0].to_dict()
    if requantize:
        rq_survival = survivals[1].to_dict()
    report = {
        "run": str(cfg.train.output_dir),
        "dtype": dtype,
        "evaluated_in": arithmetic,
        "into": into,
        "lm_head_dtype": head.dtype_in(dtype),
        "embeddings": ("untied" if head.untie_embeddings else "tied") if tied_before else "separate",
        "reloads_as": reloads_as,
        "min_agreement": min_agreement,
        "faithful": fidelity.greedy_token_agreement >= min_agreement,
        "fidelity": fidelity.to_dict(),
        "update_survival": {k: survival[k] for k in ("kept", "noise")},
        "requantized": None if rq_fidelity is None else {
            "format": requantize, "fidelity": rq_fidelity.to_dict(), "update_survival": {k: rq_survival[k] for k in ("kept", "noise")},
        },
    }
    return report, fidelity, rq_fidelity, survival, rq_survival, requantized


def is_gguf_path(out: str | Path | None) -> bool:
    return out is not None and str(out).lower().endswith(".gguf")


def check_gguf_out(cfg, out: str | Path) -> None:
    """A .gguf --out needs the exact fold: a QA-LoRA run on a GGUF base kept in its block formats."""
    if cfg.adapter.kind == "qalora" and cfg.quant.method == "gguf":
        return
    kinds = {"lora": "a plain LoRA run", "dora": "a DoRA run"}
    why = kinds.get(cfg.adapter.kind) or f"the run's base is quant.method {cfg.quant.method}, not gguf"
    raise MergeError(
        f"merge --out {out}: {why}; only a QA-LoRA run on a GGUF base folds exactly into a GGUF: merge to a "
        f"16-bit directory (--out DIR), then run `qlorakit export DIR --format gguf --out {Path(out).name}`"
    )


def exact_merge_format(
    cfg, out: str | Path | None, into: str = "dequantized", requantize: str | None = None, keep_quantized: bool = True
) -> str | None:
    """"gguf" or "int4" when this merge takes the exact QA-LoRA fold, None for the 16-bit merge.

    Raises:
        MergeError: a .gguf `out` for a run that cannot fold into a GGUF, or with `into` "original";
            `requantize` with an exact merge (it measures the 16-bit merge).
    """
    fmt = None
    if is_gguf_path(out):
        check_gguf_out(cfg, out)
        if into != "dequantized":
            raise MergeError("merge --into original: a GGUF merge folds into the GGUF's own blocks; leave --into dequantized")
        fmt = "gguf"
    elif cfg.adapter.kind == "qalora" and cfg.quant.method == "int4" and into == "dequantized" and keep_quantized:
        fmt = "int4"
    if fmt is not None and requantize:
        raise MergeError(f"merge --requantize measures a 16-bit merge; this {fmt} merge is exact and keeps the format (leave it out)")
    return fmt


def exact_spec(spec: dict, fmt: str, group_size: int | None) -> dict:
    """quantization.json of an exact QA-LoRA merge: still 4-bit, in the run's own format."""
    extras = dict(spec["extras"], merge_base="zero_points", merged_format=fmt)
    return dict(spec, weight_bits=4, group_size=group_size, backend="gguf" if fmt == "gguf" else "torch", extras=extras)


def sidecar_paths(gguf_out: str | Path) -> dict[str, Path]:
    """quantization.json / merge_report.json of a merged GGUF: FILE.gguf -> FILE.quantization.json, ..."""
    out = Path(gguf_out)
    stem = out.name[: -len(".gguf")]
    return {name: out.with_name(f"{stem}.{name}") for name in ("quantization.json", "merge_report.json")}


def merge_exact(
    loaded, cfg, out: str | Path | None, fmt: str, *, force: bool = False, overwrite: bool = False,
    min_agreement: float = 0.99, spec: dict | None = None,
) -> MergeResult:
    """Fold a QA-LoRA run into its base's mins and write it in the same 4-bit format (module docstring).

    The fidelity report compares the adapter model with the folded model (`merged_qalora_model`):
    the only difference is the fp16 rounding of each new min.
    """
    from qlorakit.adapters.inject import adapter_layers
    from qlorakit.merge.survival import update_survival
    from qlorakit.merge.zero_point import merged_qalora_model

    started = time.perf_counter()
    if out is not None:
        _check_exact_out(Path(out), fmt, overwrite)
    adapter_model, tokenizer = loaded.model, loaded.tokenizer
    merged = merged_qalora_model(adapter_model)
    prompts = probe_set(training_prompts(cfg.data.path))
    with cached_dense_weights(adapter_model), cached_dense_weights(merged):
        fidelity = fidelity_report(adapter_model, merged, tokenizer, prompts)
    survival = update_survival(adapter_model, merged).to_dict()
    report = {
        "run": str(cfg.train.output_dir), "format": fmt, "into": "zero_points", "min_agreement": min_agreement,
        "faithful": fidelity.greedy_token_agreement >= min_agreement, "fidelity": fidelity.to_dict(),
        "update_survival": {k: survival[k] for k in ("kept", "noise")}, "requantized": None,
        **format_changes(adapter_model, merged),
    }
    if not force:
        check_faithful(fidelity, min_agreement)
    written = None
    if out is not None:
        spec = spec or metadata.build_spec(cfg, loaded.source.name, Path(cfg.data.path).stem, loaded.source.location)
        layers = list(adapter_layers(adapter_model))
        group_size = merged.get_submodule(layers[0]).group_size
        files = {"quantization.json": exact_spec(spec, fmt, group_size), "merge_report.json": report}
        written = _write_exact(loaded, merged, layers, Path(out), fmt, files, overwrite)
    return MergeResult(written, fidelity, None, survival, None, report, time.perf_counter() - started, merged)


def format_changes(adapter_model, merged) -> dict:
    """What an exact fold changed besides the mins: {"format_changes": {module: "q4_k -> q4_1"},
    "tensor_bytes_change": bytes, "max_step_rounding": the largest relative fp16 rounding of a
    sub-block step d·sc of a K-quant that became q4_1/q5_1 (quant/q4_k.py), or 0.0}."""
    from qlorakit.adapters.inject import adapter_layers
    from qlorakit.quant.q4_k import affine_rounding

    changes, grown, rounding = {}, 0, 0.0
    for name, layer in adapter_layers(adapter_model).items():
        before, after = layer.base_layer.qweight, merged.get_submodule(name).qweight
        if before.format != after.format:
            changes[name] = f"{before.format} -> {after.format}"
            grown += after.nbytes() - before.nbytes()
            if before.format in ("q4_k", "q5_k"):
                rounding = max(rounding, affine_rounding(before))
    return {"format_changes": changes, "tensor_bytes_change": grown, "max_step_rounding": rounding}


def _check_exact_out(out: Path, fmt: str | None, overwrite: bool) -> None:
    """Refuse before any work an output that exists (without overwrite) or is of the wrong kind."""
    from qlorakit.files.atomic import check_output_dir, check_output_file

    if fmt == "gguf":
        check_output_file(out, overwrite)  # the merged GGUF is one file
    else:
        check_output_dir(out, overwrite)


def _write_exact(loaded, merged, layers: list[str], out: Path, fmt: str, files: dict[str, dict], overwrite: bool) -> Path:
    """GGUF: the source file rewritten with the folded tensors, JSON sidecars beside it; int4: a directory."""
    if fmt == "int4":
        from qlorakit.models.quantized_dir import save_quantized_dir

        return save_quantized_dir(merged, loaded.tokenizer, out, extra_files=files, overwrite=overwrite)
    from qlorakit.models.gguf_write import write_merged_gguf

    new_weights = {name: merged.get_submodule(name).qweight for name in layers}  # transformers row order
    write_merged_gguf(loaded.source.location, new_weights, merged.config, out,
                      chat_template=getattr(loaded.tokenizer, "chat_template", None))
    for name, path in sidecar_paths(out).items():
        metadata.write_json_atomic(path, files[name])
    return out


def merge_run(run_dir: str | Path, out: str | Path, progress: bool = True, **options) -> MergeResult:
    """Restore a run from its metadata and merge it (options as in `merge_loaded`).

    Every input is checked before the model is loaded: the run (not being written, config.yaml,
    quantization.json, a complete adapter: `check_run_dir`) and `out` (a .gguf the run cannot fold
    into, or an output that exists).
    """
    from qlorakit.models.restore import check_run_dir, load_run

    cfg = check_run_dir(run_dir)
    exact = exact_merge_format(cfg, out, options.get("into", "dequantized"), options.get("requantize"))
    if out is not None:  # every output is checked before the model is loaded
        _check_exact_out(Path(out), exact, options.get("overwrite", False))
    loaded, cfg = load_run(run_dir, progress=progress)
    return merge_loaded(loaded, cfg, out, spec=metadata.read_spec(run_dir), **options)


def format_merge(result: MergeResult) -> str:
    lines = [result.fidelity.format_table()]
    kept, noise = result.survival["kept"], result.survival["noise"]
    if result.report.get("into") == "zero_points":
        loss = f"exact {result.report['format']} fold into the group mins: the only loss is their fp16 rounding"
    else:
        loss = "exact fold: 1, 0; the only loss is the final cast"
    lines.append(f"  update kept {kept:.4f}, noise {noise:.4f} x |update| ({loss})")
    head, body = result.report.get("lm_head_dtype"), result.report.get("dtype")
    if head is not None and head != body:
        tied = " (with the input embeddings it is tied to)" if result.report.get("embeddings") == "tied" else ""
        lines.append(f"  output head in {head}{tied}, the rest in {body}; config.json says {result.report['reloads_as']}: "
                     f"transformers loads a model in one dtype, and only that one holds every stored tensor exactly "
                     f"(from_pretrained(..., dtype={body}) takes the smaller footprint and rounds the head)")
    changes = result.report.get("format_changes") or {}
    if changes:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(Counter(changes.values()).items()))
        lines.append(f"  formats changed to hold the update: {len(changes)} tensors ({kinds}), "
                     f"{result.report['tensor_bytes_change'] / 2**20:+.2f} MiB; codes kept, largest fp16 rounding of a "
                     f"sub-block step {result.report['max_step_rounding']:.2e} of it (merge_report.json lists them)")
    if result.requantized_fidelity is not None:
        r = result.requantized_fidelity
        rq = result.requantized_survival
        lines += [
            "",
            f"re-quantized like peft's merge_and_unload ({result.report['requantized']['format']}): agreement "
            f"{r.greedy_token_agreement:.4f}, max |logit diff| {r.max_abs_logit_diff:.4g}, KL {r.mean_kl:.4g}, "
            f"generations equal {'yes' if r.generations_equal else 'no'}; update kept {rq['kept']:.3f}, noise {rq['noise']:.3f} x |update|",
        ]
    if result.out_dir is not None:
        lines.append(f"\nmerged model written to {result.out_dir} in {result.seconds:.1f} s")
    return "\n".join(lines)
