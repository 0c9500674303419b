"""The memory model of `qlorakit plan`: peak bytes per device of one training step.

Notation: B micro-batch rows per device, T = data.max_length (rows are assumed to fill it),
N = B·T tokens, h hidden size, i intermediate size, kv = kv_heads·head_dim, L layers, V vocab,
e bytes of the compute dtype (bf16/fp16 2, fp32 4), r LoRA rank, P processes.

    weights      Σ_layers storage_bytes(format, out, in)  (codes + per-group statistics; QuantFormat)
                 + dense parameters · e                     (embeddings, norms, head, biases)
    adapters     Σ_wrapped r·(in + out) · 4                 (fp32, adapters/lora.py)
    gradients    trainable · 4
    optimizer    trainable · 8 (AdamW: two fp32 moments) | · 2 (adamw8bit: two 8-bit moments)
    activations  per layer, saved for backward (Llama family with qlorakit's fused RMSNorm/SwiGLU;
                 QuantLinear saves only its input, LoRA its input (shared) and A·x in fp32):
                     N·e·(2h  norm inputs + 2h normed + h q + 2kv k,v + h attention out + 3i gate,up,act)
                     + N·4·r·(adapters per layer) + 8·p·N·(dropout-masked inputs) (dropped positions) + 4·B·heads·T (lse)
                 no checkpointing: L · layer;   checkpointing: L · N·h·e (layer inputs) + one layer,
                 which is rebuilt in backward after the loss's blocks are freed: the step holds
                 max(one layer, loss) on top of the layer inputs (part `recompute`)
    loss         chunked cross-entropy (train/loss.py): c = min(256, N) rows of logits at a time,
                 c·V·e from the head and its in-place fp32 up-cast c·V·4 (one block for fp32),
                 plus the saved (N, h) gradient; a model without a plain head takes transformers'
                 path: N·V·(e + 3·4)
    transient    the dense weights QuantLinear rebuilds for each matmul: on the CPU one reused
                 buffer of the largest (out, in) in e (quant/linear.py scratch_buffer), plus an
                 fp32 working copy of it when e < 4 (formats that dequantize in fp32 first), and
                 with dropout an (N, widest adapter input) buffer of the zeroed input in the adapters'
                 matmul dtype (bf16 for plain LoRA in bf16, else fp32; adapters/update.py); on CUDA
                 the largest weight in e; plus two (N, max(h, i)) gradient buffers
    overhead     CPU: the process baseline (python + torch + transformers + tokenizer: `rss_base`, which
                 `qlorakit plan` measures on the user's machine, plan/baseline.py) and glibc
                 allocator slack, calibrated, by the mmap threshold of the run (qlorakit/allocator.py):
                 32 MiB (bf16): heap fragmentation, HEAP_FRAGMENTATION_OF_ACTIVATIONS · activations
                 + HEAP_FRAGMENTATION_OF_LOSS · loss, and with checkpointing
                 HEAP_FRAGMENTATION_CHECKPOINTING_BF16 · (activations without checkpointing)
                 + HEAP_FRAGMENTATION_OF_LOSS · loss; 1 MiB otherwise (fp32, fp16):
                 RETAINED_FRACTION of the dense model's bytes (RETAINED_FRACTION_CHECKPOINTING
                 with checkpointing); CUDA: the CUDA context and caching-allocator reserve.

    peak = max(load, train):  load  = baseline + dense tensors in e + the largest linear weight
                                      as 3 fp32 copies (quantized as it is read) + quantized
                                      weights (CPU only);
                                      with quant.method gguf baseline + dense tensors in e + the
                                      kept blocks, copied one tensor at a time
                              train = weights + adapters + gradients + optimizer + activations
                                      + loss + transient + overhead

With P processes: DDP divides nothing per device (every rank holds the whole model and its own
micro-batch); FSDP (`fsdp=True`, train/fsdp.py) divides what it shards by P: the quantized weights
of the decoder layers (a quantized head stays whole), adapters, gradients and optimizer states;
the dense weights (embeddings, final norm, head) stay whole on every rank. It adds

    gathered     the decoder layers FSDP has gathered at once: the one computing and the one it
                 prefetches, each Q_layers/L + adapters/L in full (part `gathered_layers`)

and on the CPU a rank reads its 4-bit base as a memory map (the GGUF file's blocks, or the quantized
cache) until FSDP copies its shards out of it: the load holds Q/P of the quantized weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from qlorakit.config import Config
from qlorakit.plan.shapes import ModelShapes
from qlorakit.allocator import REUSE_THRESHOLD_BYTES, mmap_threshold_for

MIB = 2**20
GIB = 2**30
CHUNK_TOKENS = 256  # train/loss.py CHUNK_TOKENS
# The process baseline where it is not measured (plan/baseline.py measures it for `qlorakit plan`):
# RSS after importing torch, transformers, qlorakit's train loop, a Llama class and SmolLM2's
# tokenizer on the machine the plan was calibrated on (bench/plan_accuracy.py).
RSS_BASE = 400 * MIB
# glibc keeps much of the dense model freed after quantization as fragmented, resident heap that
# the step's activations only partly reuse: this fraction of the dense model's bytes stays in the
# peak (calibrated on the runs of bench/results/plan_accuracy.json; not derived).
RETAINED_FRACTION = 0.5
# With activation checkpointing the step frees few small activation tensors, and the retained heap
# stays far smaller (RSS probes between steps; calibrated on the same runs).
RETAINED_FRACTION_CHECKPOINTING = 0.125
# bf16 without checkpointing trains on glibc's heap (qlorakit/allocator.py): the freed dense model is
# reused, but the heap fragments over the first steps, so that at the peak it holds free space of
# about this fraction of the activations plus this multiple of the loss's blocks (its bf16 logits
# blocks live in the heap too). Fitted on a first pass of the four bf16 runs of
# bench/results/plan_accuracy.json (8 steps each; within 3.5% there, -0.6% to +6.0% on the next
# pass, which the file holds); not derived.
HEAP_FRAGMENTATION_OF_ACTIVATIONS = 0.82
HEAP_FRAGMENTATION_OF_LOSS = 2.6
# bf16 with checkpointing trains on the heap too, which fragments as the layers are rebuilt, step
# after step: free space of about this fraction of the activations a step without checkpointing
# would hold, plus the same multiple of the loss. Fitted on a first pass of the two bf16
# checkpointing runs of bench/results/plan_accuracy.json (the file holds the next: +2.5%, +4.0%);
# not derived. fp16 is not measured and keeps the fp32 fractions.
HEAP_FRAGMENTATION_CHECKPOINTING_BF16 = 0.35
CUDA_CONTEXT = 600 * MIB  # CUDA context + cuBLAS workspace, outside torch's allocated bytes
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def format_size(n: int) -> str:
    """Bytes as the plan tables print them: "4.88 GiB" from 1 GiB up, else "140.8 MiB"."""
    return f"{n / GIB:,.2f} GiB" if n >= GIB else f"{n / MIB:,.1f} MiB"


@dataclass
class Plan:
    """Bytes per device of each part, and the peak."""

    model: str
    device: str
    processes: int
    fsdp: bool
    batch_size: int
    max_length: int
    gradient_checkpointing: bool
    dtype: str
    parts: dict[str, int]
    weights_by_format: dict[str, int]
    load_bytes: int
    train_bytes: int
    peak_bytes: int
    activations_without_checkpointing: int
    activations_with_checkpointing: int
    trainable_parameters: int
    gpu_memory: int | None = None
    fits: bool | None = None
    advice: list[dict] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def quantized_bytes(shapes: ModelShapes, group_size: int, double_quant: bool) -> dict[str, int]:
    """Σ storage_bytes per format label, e.g. {"nf4+dq": ...} (QuantFormat.storage_bytes)."""
    from qlorakit.quant.registry import get_format

    out: dict[str, int] = {}
    for name, out_f, in_f in shapes.quantized:
        if name in ("nf4", "fp4"):
            fmt, label = get_format(name, group_size, double_quant=double_quant), name + ("+dq" if double_quant else "")
        elif name == "int4":
            fmt, label = get_format(name, group_size), name
        else:
            fmt, label = get_format(name), name  # GGUF block formats: 32-value blocks
        codes, stats = fmt.storage_bytes(out_f, in_f)
        out[label] = out.get(label, 0) + codes + stats
    return out


def head_quantized_bytes(shapes: ModelShapes, group_size: int, double_quant: bool) -> int:
    """The part of `quantized_bytes` that is the output head's (quant.quantize_lm_head), else 0."""
    if shapes.quantized_head is None:
        return 0
    head = ModelShapes(**{**shapes.__dict__, "quantized": [shapes.quantized_head]})
    return sum(quantized_bytes(head, group_size, double_quant).values())


def layer_activation_bytes(shapes: ModelShapes, batch: int, seq: int, e: int, r: int, dropout: float) -> int:
    """Bytes one decoder layer saves for backward (see the module docstring)."""
    n, h, i = batch * seq, shapes.hidden, shapes.intermediate
    kv = shapes.kv_heads * shapes.head_dim
    adapters = len(shapes.lora) // max(1, shapes.layers)
    adapter_inputs = sum(in_f for in_f, _ in shapes.lora[:adapters]) if dropout > 0 else 0
    return (n * e * (5 * h + 2 * kv + 3 * i) + n * 4 * r * adapters + int(8 * dropout * n * adapter_inputs)
            + 4 * batch * shapes.heads * seq)


def activation_bytes(shapes: ModelShapes, batch: int, seq: int, e: int, r: int, dropout: float, checkpointing: bool) -> int:
    """All layers' saved activations, plus the final norm's input and output."""
    n = batch * seq
    layer = layer_activation_bytes(shapes, batch, seq, e, r, dropout)
    body = shapes.layers * n * shapes.hidden * e + layer if checkpointing else shapes.layers * layer
    return body + 2 * n * shapes.hidden * e


def loss_bytes(shapes: ModelShapes, batch: int, seq: int, e: int) -> int:
    """Peak of the cross-entropy over the output head (logits never exist whole on the chunked path)."""
    n = batch * seq
    if not shapes.plain_head:
        return n * shapes.vocab * (e + 3 * 4)
    c = min(CHUNK_TOKENS, n)
    upcast = 4 if e != 4 else 0
    return c * shapes.vocab * (e + upcast) + n * shapes.hidden * e


def transient_bytes(shapes: ModelShapes, batch: int, seq: int, e: int, device: str, dropout: float,
                    adapter_matmul_bytes: int = 4) -> int:
    """Dense weights rebuilt for matmuls (+ dropout buffers on the CPU) + two (N, max(h, i))
    gradient buffers; see the module docstring. `adapter_matmul_bytes`: 2 where the adapters'
    matmuls run in bf16 (adapters/update.py), else 4."""
    n = batch * seq
    largest = max((o * i for _, o, i in shapes.quantized), default=0)
    gradients = 2 * n * max(shapes.hidden, shapes.intermediate) * e
    if device != "cpu":
        return largest * e + gradients
    weights = largest * e + (largest * 4 if e != 4 else 0)
    widest_input = max((in_f for in_f, _ in shapes.lora), default=0)
    dropped_inputs = n * widest_input * adapter_matmul_bytes if dropout > 0 else 0  # the zeroed input
    return weights + dropped_inputs + gradients


def allocator_slack_bytes(dtype: str, checkpointing: bool, dense_model: int, activations: int, loss: int,
                          activations_without_checkpointing: int) -> int:
    """Resident memory glibc's allocator holds beyond the live tensors at the peak, by the mmap
    threshold the run trains with (qlorakit/allocator.py; constants above, calibrated)."""
    if mmap_threshold_for(dtype, checkpointing) == REUSE_THRESHOLD_BYTES:
        if checkpointing:
            return int(HEAP_FRAGMENTATION_CHECKPOINTING_BF16 * activations_without_checkpointing + HEAP_FRAGMENTATION_OF_LOSS * loss)
        return int(HEAP_FRAGMENTATION_OF_ACTIVATIONS * activations + HEAP_FRAGMENTATION_OF_LOSS * loss)
    return int((RETAINED_FRACTION_CHECKPOINTING if checkpointing else RETAINED_FRACTION) * dense_model)


def estimate(cfg: Config, shapes: ModelShapes, device: str = "cpu", processes: int = 1, fsdp: bool = False,
             rss_base: int = RSS_BASE) -> Plan:
    """The plan of `cfg` on `device` ("cpu" or "cuda") with `processes` ranks (see module docstring);
    `rss_base` is the CPU process baseline (plan/baseline.py measures it; RSS_BASE where calibrated)."""
    e = DTYPE_BYTES[cfg.model.dtype]
    t, a = cfg.train, cfg.adapter
    batch, seq = t.batch_size, cfg.data.max_length
    if a.kind == "vera":  # VeRA trains λ_b (out) and λ_d (r) per layer over one frozen shared pair
        trainable = sum(out_f + a.r for _, out_f in shapes.lora)
    else:
        magnitude = 1 if a.kind == "dora" else 0  # DoRA trains one magnitude per output row as well
        trainable = sum(a.r * (in_f + out_f) + magnitude * out_f for in_f, out_f in shapes.lora)
    by_format = quantized_bytes(shapes, cfg.quant.group_size, cfg.quant.double_quant)
    share = processes if fsdp else 1
    head = head_quantized_bytes(shapes, cfg.quant.group_size, cfg.quant.double_quant)
    in_layers = sum(by_format.values()) - head
    activations_without_checkpointing = activation_bytes(shapes, batch, seq, e, a.r, a.dropout, False)
    parts = {
        "quantized_weights": in_layers // share + head,
        "dense_weights": shapes.dense_parameters * e,
        "adapters": trainable * 4 // share,
        "gradients": trainable * 4 // share,
        "optimizer": trainable * (8 if t.optimizer == "adamw" else 2) // share,
        "activations": activation_bytes(shapes, batch, seq, e, a.r, a.dropout, t.gradient_checkpointing),
        "loss": loss_bytes(shapes, batch, seq, e),
        "transient": transient_bytes(shapes, batch, seq, e, device, a.dropout,
                                     2 if cfg.model.dtype == "bf16" and a.kind == "lora" else 4),
    }
    if fsdp and processes > 1:
        parts["gathered_layers"] = 2 * (in_layers + trainable * 4) // max(1, shapes.layers)
    if t.gradient_checkpointing:
        # The layer rebuilt in backward lives after the loss's (chunk, V) blocks are gone: the two
        # overlap in time, so the step holds the larger of them, not their sum.
        layer = layer_activation_bytes(shapes, batch, seq, e, a.r, a.dropout)
        parts["activations"] -= layer
        parts["recompute"] = max(0, layer - parts["loss"])
    if device == "cpu":
        # What the loader builds: the tensors that stay dense (embeddings, norms, head; every weight
        # with quant.method none) in the compute dtype, and the largest linear weight in flight as it
        # is quantized (models/load.py), counted as three fp32 copies (the weight and quantize()'s
        # temporaries); quant.method gguf keeps the file's blocks instead, each tensor's mapping
        # released once it is copied (models/gguf_io.py). The quantized codes are held once, and under
        # fsdp a rank copies only its shards out of a memory map (a first run's rank 0, which writes
        # the quantized cache, holds them whole once: not modelled).
        kept_blocks = cfg.quant.method == "gguf"
        largest = max((o * i for _, o, i in shapes.quantized), default=0)
        in_flight = 0 if kept_blocks or cfg.quant.method == "none" else 3 * 4 * largest
        built = shapes.dense_parameters * e + in_flight
        # The slack is fitted to the model's size in the compute dtype (bench/plan_accuracy.py): a
        # fit, not the load's leftovers, so it stays proportional to every parameter, as calibrated.
        model_bytes = (shapes.dense_parameters if kept_blocks else shapes.parameters) * e
        parts["allocator_slack"] = allocator_slack_bytes(
            cfg.model.dtype, t.gradient_checkpointing, model_bytes, parts["activations"], parts["loss"],
            activations_without_checkpointing)
        parts["framework"] = rss_base
        load = rss_base + built + parts["quantized_weights"]
    else:
        parts["framework"] = CUDA_CONTEXT
        load = 0  # the model is read on the host and moved: the device sees only its final size
    train = sum(parts.values())
    return Plan(
        model=shapes.name, device=device, processes=processes, fsdp=fsdp, batch_size=batch, max_length=seq,
        gradient_checkpointing=t.gradient_checkpointing, dtype=cfg.model.dtype, parts=parts,
        weights_by_format=by_format, load_bytes=load, train_bytes=train, peak_bytes=max(load, train),
        activations_without_checkpointing=activations_without_checkpointing,
        activations_with_checkpointing=activation_bytes(shapes, batch, seq, e, a.r, a.dropout, True),
        trainable_parameters=trainable,
    )
