"""`qlorakit inspect`: parameter counts and memory, from the architecture alone.

Nothing is loaded but the config: the model is built on the meta device, every linear layer
that quantization would replace is counted at the format's storage size, and the LoRA
parameters are counted from the shapes of the layers they would wrap:

    LoRA parameters of one layer = r · (in_features + out_features)
    (QA-LoRA: r · (in_features / G + out_features))
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field

from torch import nn

from qlorakit.adapters.inject import find_targets
from qlorakit.dtypes import to_torch_dtype
from qlorakit.models import gguf_io
from qlorakit.models.load import build_skeleton, load_config
from qlorakit.models.sources import ModelSourceError, resolve_source
from qlorakit.quant.registry import format_for_config, get_format
from qlorakit.quant.replace import linear_layer_names

MIB = 1024 * 1024


@dataclass
class ModuleGroup:
    """All modules sharing a leaf name and class, e.g. the 30 `q_proj` Linear layers."""

    name: str
    kind: str
    count: int
    shapes: list[list[int]]
    dtype: str
    quantized: bool
    parameters: int
    bytes: int


@dataclass
class InspectReport:
    model: str
    architecture: str
    source_kind: str
    dtype: str
    quant: str
    total_parameters: int
    quantized_parameters: int
    memory_mib_before: float
    memory_mib_after: float
    memory_mib_quant_stats: float
    lora_r: int | None
    lora_targets: list[str] | str | None
    lora_layers: int
    trainable_parameters: int
    all_parameters: int
    trainable_percent: float
    modules: list[ModuleGroup] = field(default_factory=list)
    # GGUF sources: per tensor type of the file, {"type", "tensors", "parameters", "bytes"}.
    file_types: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def inspect_model(
    source: str,
    quant: str | None = None,
    dtype: str = "bf16",
    lora_r: int | None = 16,
    lora_targets: str | list[str] = "all-linear",
    group_size: int | None = None,
    double_quant: bool = True,
    quantize_lm_head: bool = False,
) -> InspectReport:
    """quant: a format key, "none", or "gguf" (a GGUF file's own formats, tensor by tensor); the
    default is "gguf" for a .gguf file and "nf4" otherwise."""
    resolved = resolve_source(source)
    quant = quant or ("gguf" if resolved.kind == "gguf" else "nf4")
    if quant == "gguf" and resolved.kind != "gguf":
        raise ModelSourceError(f"--quant gguf counts a GGUF file's own formats, but {resolved.spec} is not a .gguf file")
    config = load_config(resolved)
    torch_dtype = to_torch_dtype(dtype)
    model = build_skeleton(config, torch_dtype, device="meta")
    fmt = format_for_config(quant, group_size, double_quant)
    file_formats = gguf_io.linear_formats(resolved.location, model) if quant == "gguf" else {}
    linear = set(linear_layer_names(model, include_head=quantize_lm_head))
    formats = {name: fmt for name in linear} if fmt else {name: get_format(file_formats[name]) for name in linear & set(file_formats)}
    element = torch_dtype.itemsize

    groups: OrderedDict[tuple[str, str, str], ModuleGroup] = OrderedDict()
    seen: set[int] = set()
    total = quantized = before = after = stats = 0
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        if not own:
            continue
        seen.update(id(p) for p in own)
        count = sum(p.numel() for p in own)
        is_quantized = name in formats
        nbytes = count * element
        if is_quantized:
            weight = module.weight
            out_f, in_f = weight.shape if isinstance(module, nn.Linear) else tuple(reversed(weight.shape))
            code_bytes, stat_bytes = formats[name].storage_bytes(out_f, in_f)
            bias = count - weight.numel()
            nbytes = code_bytes + bias * element
            stats += stat_bytes
            quantized += weight.numel()
        total += count
        before += count * element
        after += nbytes
        leaf = name.rsplit(".", 1)[-1] or type(module).__name__
        stored_as = formats[name].name if is_quantized else dtype
        key = (leaf, type(module).__name__, stored_as)  # a GGUF mix (q4_k and q6_k ffn_down) shows as two rows
        group = groups.get(key)
        shape = list(own[0].shape)
        if group is None:
            groups[key] = ModuleGroup(leaf, type(module).__name__, 1, [shape], stored_as, is_quantized, count, nbytes)
        else:
            group.count += 1
            group.parameters += count
            group.bytes += nbytes
            if shape not in group.shapes:
                group.shapes.append(shape)

    trainable, layers = (0, 0)
    if lora_r:
        targets = find_targets(model, lora_targets)
        layers = len(targets)
        for target in targets:
            module = model.get_submodule(target)
            in_f, out_f = (module.in_features, module.out_features) if isinstance(module, nn.Linear) else tuple(module.weight.shape)
            trainable += lora_r * (in_f + out_f)
    all_parameters = total + trainable
    return InspectReport(
        model=resolved.name,
        architecture=config.model_type,
        source_kind=resolved.kind,
        dtype=dtype,
        quant=quant,
        total_parameters=total,
        quantized_parameters=quantized,
        memory_mib_before=before / MIB,
        memory_mib_after=after / MIB,
        memory_mib_quant_stats=stats / MIB,
        lora_r=lora_r,
        lora_targets=lora_targets if lora_r else None,
        lora_layers=layers,
        trainable_parameters=trainable,
        all_parameters=all_parameters,
        trainable_percent=100.0 * trainable / all_parameters if all_parameters else 0.0,
        modules=list(groups.values()),
        file_types=gguf_io.type_breakdown(resolved.location) if resolved.kind == "gguf" else [],
    )


def format_report(report: InspectReport) -> str:
    """Human-readable tables of an InspectReport."""
    stored = "in the file's own formats" if report.quant == "gguf" else f"quantized to {report.quant}"
    name_width = max([26, *(len(g.name) + 2 for g in report.modules)])
    kind_width = max([14, *(len(g.kind) + 2 for g in report.modules)])
    lines = [
        f"model        {report.model} ({report.architecture}, {report.source_kind})",
        f"parameters   {report.total_parameters:,} base"
        + (f" ({report.quantized_parameters:,} {stored})" if report.quantized_parameters else ""),
        "",
        f"{'module':<{name_width}}{'type':<{kind_width}}{'count':>6}  {'shape':<24}{'dtype':<7}{'params':>14}{'MiB':>10}",
    ]
    for g in report.modules:
        shape = ", ".join("x".join(map(str, s)) for s in g.shapes[:2]) + (" ..." if len(g.shapes) > 2 else "")
        lines.append(f"{g.name:<{name_width}}{g.kind:<{kind_width}}{g.count:>6}  {shape:<24}{g.dtype:<7}{g.parameters:>14,}"
                     f"{g.bytes / MIB:>10.2f}")
    lines += [
        "",
        f"memory       {report.memory_mib_before:,.2f} MiB in {report.dtype} before quantization",
        f"             {report.memory_mib_after:,.2f} MiB after ({report.quant} linear weights + {report.dtype} other parameters)"
        + (f" + {report.memory_mib_quant_stats:.2f} MiB quantization statistics" if report.memory_mib_quant_stats else ""),
    ]
    if report.file_types:
        lines += ["", f"{'GGUF type':<12}{'tensors':>8}{'params':>14}{'MiB':>10}"]
        lines += [f"{t['type']:<12}{t['tensors']:>8}{t['parameters']:>14,}{t['bytes'] / MIB:>10.2f}" for t in report.file_types]
        lines.append("")
    if report.lora_r:
        targets = report.lora_targets if isinstance(report.lora_targets, str) else ",".join(report.lora_targets)
        lines += [
            f"LoRA         r={report.lora_r} on {report.lora_layers} layers ({targets})",
            f"trainable    {report.trainable_parameters:,} of {report.all_parameters:,} ({report.trainable_percent:.4f}%)",
        ]
    return "\n".join(lines)
