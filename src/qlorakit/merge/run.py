"""`qlorakit merge RUN_DIR --out DIR`: merge a training run and prove the merge is faithful.

    adapter model = the run's quantized base + adapter (restored from config.yaml)
    merged        = dequantize + fold in fp32 + cast            (merge/fold.py)
    fidelity      = adapter model vs merged on the probe set    (merge/fidelity.py)
    refuse to write when greedy agreement < min_agreement, unless forced
    write         = HF directory + quantization.json + merge_report.json, atomically (merge/write.py)
    --requantize  = also measure what peft's re-quantizing merge would have kept (report only)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qlorakit import metadata
from qlorakit.dtypes import to_torch_dtype
from qlorakit.merge.fidelity import FidelityReport, check_faithful, fidelity_report, probe_set
from qlorakit.merge.fold import MergeError, merge_to_dense
from qlorakit.quant.linear import cached_dense_weights


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


def training_prompts(data_path: str, limit: int = 8) -> list[str]:
    """The user turns / instructions of the first `limit` training rows (for the probe set)."""
    from qlorakit.data.formats import resolve_format, validate_rows
    from qlorakit.data.read import read_rows

    try:
        table = read_rows(data_path)
        rows = validate_rows(table, resolve_format(table, "auto"))
    except (ValueError, OSError):
        return []  # the data moved or changed since training: probe with the generic prompts only
    prompts = []
    for row in rows[:limit]:
        if "messages" in row:
            users = [m["content"] for m in row["messages"] if m.get("role") == "user"]
            prompts += users[:1]
        elif "instruction" in row:
            prompts.append("\n\n".join(p for p in (row["instruction"], row.get("input") or "") if p))
        elif "prompt" in row:
            prompts.append(row["prompt"])
    return prompts


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


def merge_loaded(
    loaded,
    cfg,
    out: str | Path | None,
    *,
    dtype: str = "bf16",
    into: str = "dequantized",
    keep_lm_head_fp16: bool = False,
    requantize: str | None = None,
    force: bool = False,
    overwrite: bool = False,
    min_agreement: float = 0.99,
    spec: dict | None = None,
) -> MergeResult:
    """Merge an adapter model already in memory (what `qlorakit train` and `demo` hold)."""
    from qlorakit.merge.requantize import requantize_like_peft, update_survival
    from qlorakit.merge.write import save_merged

    started = time.perf_counter()
    adapter_model, tokenizer = loaded.model, loaded.tokenizer
    original = original_weights_of(loaded.source) if into == "original" else None
    merged = merge_to_dense(adapter_model, to_torch_dtype(dtype), keep_lm_head_fp16, original)
    prompts = probe_set(training_prompts(cfg.data.path))
    with cached_dense_weights(adapter_model):
        fidelity = fidelity_report(adapter_model, merged, tokenizer, prompts)
    survival = update_survival(adapter_model, merged, original).to_dict()
    rq_fidelity = rq_survival = None
    if requantize:
        requantized = requantize_like_peft(merged, requantize, compute_dtype=to_torch_dtype(dtype))
        with cached_dense_weights(adapter_model), cached_dense_weights(requantized):
            rq_fidelity = fidelity_report(adapter_model, requantized, tokenizer, prompts)
        rq_survival = update_survival(adapter_model, requantized, original).to_dict()
    head = "fp16" if keep_lm_head_fp16 else dtype
    report = {
        "run": str(cfg.train.output_dir),
        "dtype": dtype,
        "into": into,
        "lm_head_dtype": head,
        "min_agreement": min_agreement,
        "faithful": fidelity.greedy_token_agreement >= min_agreement,
        "fidelity": fidelity.to_dict(),
        "update_survival": {k: survival[k] for k in ("kept", "noise")},
        "requantized": None if rq_fidelity is None else {
            "format": requantize, "fidelity": rq_fidelity.to_dict(), "update_survival": {k: rq_survival[k] for k in ("kept", "noise")},
        },
    }
    if not force:
        try:
            check_faithful(fidelity, min_agreement)
        except ValueError as error:
            if to_torch_dtype(dtype) != to_torch_dtype(cfg.model.dtype):
                raise type(error)(f"{error} (the run computed in {cfg.model.dtype}; a {dtype} merge also changes the "
                                  f"arithmetic: try --dtype {cfg.model.dtype})") from None
            raise
    out_dir = None
    if out is not None:
        spec = spec or metadata.build_spec(cfg, loaded.source.name, Path(cfg.data.path).stem, loaded.source.location)
        files = {"quantization.json": metadata.merged_spec(spec, dtype, into, head), "merge_report.json": report}
        out_dir = save_merged(merged, tokenizer, out, extra_files=files, overwrite=overwrite)
    return MergeResult(out_dir, fidelity, rq_fidelity, survival, rq_survival, report, time.perf_counter() - started, merged)


def merge_run(run_dir: str | Path, out: str | Path, progress: bool = True, **options) -> MergeResult:
    """Restore a run from its metadata and merge it (options as in `merge_loaded`)."""
    from qlorakit.models.restore import load_run

    loaded, cfg = load_run(run_dir, progress=progress)
    return merge_loaded(loaded, cfg, out, spec=metadata.read_spec(run_dir), **options)


def format_merge(result: MergeResult) -> str:
    lines = [result.fidelity.format_table()]
    kept, noise = result.survival["kept"], result.survival["noise"]
    lines.append(f"  update kept {kept:.4f}, noise {noise:.4f} x |update| (exact fold: 1, 0; the only loss is the final cast)")
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
