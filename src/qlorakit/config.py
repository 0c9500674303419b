"""The training config: frozen dataclasses, mirrored one-to-one by the YAML file and `section.key=value`.

A YAML config names only what it changes; every other key takes the default below. Values are checked
when a section is built, so a `Config` that exists is a valid one; every error is a `ConfigError` whose
one-line message names the key in dotted form (`adapter.r`), the bad value and what is allowed.

Text from the command line is read with YAML scalar rules (`true`, `null`, `1e-3`), except that string
keys keep the text as typed (`data.template=yes` stays "yes") and `adapter.targets=q_proj,v_proj` is a list.
"""

from __future__ import annotations

import difflib
import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import cache
from pathlib import Path
from typing import Any, Callable, ClassVar

import yaml

from qlorakit.files.atomic import write_text_atomic


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type or a value outside what it allows."""


DTYPES = ("bf16", "fp16", "fp32")
ALIASES = {"merge.keep_lm_head_fp16": "merge.lm_head_dtype: fp16"}
"""Older keys still read, each as what it stands for; a saved config writes only the new key."""
GGUF_GROUP_SIZE = 32  # every GGUF block format qlorakit handles (q4_0, q4_1, q5_*, q8_0) has 32-value blocks


class _Section:
    """Shared checks for the six sections: coerce each field to its annotated type, then check its value."""

    _section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            key = f"{self._section}.{f.name}"
            value = _coerce(key, hints[f.name], getattr(self, f.name))
            object.__setattr__(self, f.name, value)  # frozen: normalise (int -> float, list -> tuple) once here
            check = _CHECKS.get(key)
            if check is not None and not check[0](value):
                raise ConfigError(f"{key}: must be {check[1]}, got {_show(value)}")
        self._check()

    def _check(self) -> None:
        """Checks that involve two keys of the same section."""


@dataclass(frozen=True)
class ModelConfig(_Section):
    _section = "model"
    name: str = "smollm2"
    """Model source: `smollm2` (the embedded default), a Hugging Face directory, a `.gguf` file or a hub id."""
    dtype: str = "bf16"
    """Compute dtype of activations, adapters and unquantized layers: bf16, fp16 or fp32."""
    allow_pickle_weights: bool = False
    """Read an HF directory whose weights are only pytorch_model*.bin pickles, with torch.load(weights_only=True)
    (tensors only; any other object is refused). Off: such a directory is an error, since unpickling can run code."""


@dataclass(frozen=True)
class QuantConfig(_Section):
    _section = "quant"
    method: str = "nf4"
    """Base format: nf4, fp4, int4 (per-group zero points), gguf (each tensor keeps its block type) or none."""
    double_quant: bool = True
    """nf4/fp4 only: quantize the per-block absmax scales again (8-bit), saving ~0.37 bits per weight."""
    group_size: int = 64
    """Values along in_features sharing one scale: nf4/fp4 block size, int4 group (32/64/128); gguf uses 32."""
    quantize_lm_head: bool = False
    """Quantize the output head too; off by default, as its error reaches every logit."""

    def _check(self) -> None:
        g = self.group_size
        if self.method == "int4" and g not in (32, 64, 128):
            raise ConfigError(f"quant.group_size: must be 32, 64 or 128 with quant.method int4, got {g}")

    @property
    def base_group_size(self) -> int | None:
        """Group size of the base format as stored (32 for gguf), or None for unquantized bases."""
        return {"gguf": GGUF_GROUP_SIZE, "none": None}.get(self.method, self.group_size)


@dataclass(frozen=True)
class AdapterConfig(_Section):
    _section = "adapter"
    kind: str = "lora"
    """lora: x ↦ W0x + s·BAx (Hu et al. 2021); qalora: x is mean-pooled per quantization group first, so the
    update folds exactly into the group zero points (Xu et al. 2023); needs quant.method int4 or gguf;
    dora: a trained magnitude per output row over LoRA's direction (Liu et al. 2024); vera: one frozen
    random pair shared by all layers, two trained vectors per layer, no alpha (Kopiczko et al. 2023)."""
    r: int = 16
    """Rank of the update: A is (r, in_features), B is (out_features, r)."""
    alpha: float = 32.0
    """Scale numerator: the update is multiplied by s = alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = 0.05
    """Dropout on the adapter's input during training, in [0, 1)."""
    targets: str | tuple[str, ...] = "all-linear"
    """`all-linear` (every linear but the head) or module names; `adapter.targets=q_proj,v_proj` is a list."""
    group_size: int | None = None
    """QA-LoRA pooling width; null means the base format's group size. Must be a multiple of it for int4/gguf."""
    use_rslora: bool = False
    """Rank-stabilised scaling s = alpha / sqrt(r) (Kalajdzievski 2023), so large ranks still learn."""

    def _check(self) -> None:
        if self.kind == "vera" and self.use_rslora:
            raise ConfigError("adapter.use_rslora: VeRA has no alpha / r scale to stabilise (its scale is in the "
                              "trained vectors); leave it false with adapter.kind vera")
        if self.group_size is not None and self.kind != "qalora":
            raise ConfigError(f"adapter.group_size: the QA-LoRA pooling width, but adapter.kind is {self.kind}; "
                              f"leave it null or use adapter.kind qalora")


@dataclass(frozen=True)
class DataConfig(_Section):
    _section = "data"
    path: str = "data/train.jsonl"
    """Training data: a .jsonl/.json/.csv/.txt file, a directory of them, or a hub dataset id."""
    format: str = "auto"
    """Row layout: alpaca, chat, prompt-completion, text, or auto (guessed from the first row's keys)."""
    template: str = "auto"
    """Row -> text: auto, alpaca, chat (the tokenizer's own chat template), plain, or a chat format given to a
    tokenizer that has none: chatml, gemma (data/templates.py, data/chat_formats.py)."""
    train_on_prompt: bool = False
    """Also compute the loss on prompt tokens. Off: prompt labels are -100, so only answers are learned."""
    max_length: int = 512
    """Tokens per example (or per packed sequence); longer examples are truncated."""
    packing: bool = False
    """Concatenate examples into max_length sequences so no step is spent on padding."""
    val_fraction: float = 0.0
    """Fraction of rows held out for validation loss, in [0, 1); 0 means no validation split."""
    limit: int | None = None
    """Use only the first `limit` rows after shuffling (null: all rows)."""
    shuffle_seed: int = 42
    """Seed of the row shuffle that precedes the validation split and `limit`."""


@dataclass(frozen=True)
class TrainConfig(_Section):
    _section = "train"
    output_dir: str = "runs/x"
    """Run directory. One that already holds a run is refused unless --overwrite or resume is true."""
    max_steps: int | None = 100
    """Optimizer steps to run. Null to train for `epochs` instead; if both are set, max_steps wins."""
    epochs: float | None = None
    """Passes over the training rows (fractions allowed); used only when max_steps is null."""
    batch_size: int = 4
    """Sequences per forward/backward pass."""
    grad_accum: int = 1
    """Passes accumulated per optimizer step: the effective batch is batch_size * grad_accum."""
    lr: float = 2.0e-4
    """Peak learning rate, reached after warmup."""
    schedule: str = "cosine"
    """Learning-rate decay after warmup: constant, linear (to 0) or cosine (to 0)."""
    warmup_ratio: float = 0.03
    """Fraction of the steps spent ramping the learning rate linearly up from 0, in [0, 1)."""
    max_grad_norm: float | None = 0.3
    """Clip the global gradient norm to this (QLoRA's 0.3); null disables clipping."""
    optimizer: str = "adamw"
    """adamw (torch, fp32 states) or adamw8bit (bitsandbytes 8-bit states)."""
    weight_decay: float = 0.0
    """Decoupled weight decay on adapter weights."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, about a third more compute."""
    seed: int = 42
    """Seed for adapter initialisation, dropout and batch order."""
    save_every: int | None = 50
    """Write a resumable checkpoint every this many steps (and at the end); null: only at the end."""
    log_every: int = 1
    """Append a line to metrics.jsonl every this many steps."""
    eval_every: int | None = None
    """Compute validation loss every this many steps (needs data.val_fraction > 0); null: only at the end."""
    resume: bool = False
    """Continue the run in output_dir from its latest checkpoint."""
    tensorboard: bool = False
    """Also write the logged scalars as TensorBoard events under output_dir/tensorboard."""
    skip_nonfinite: bool = False
    """Skip a batch whose loss is NaN or inf (and log it) instead of stopping the run."""
    fast_paths: str | tuple[str, ...] = "all"
    """The training speed-ups, each by name (train/fast_paths.py): all, none, or a list of
    fused_kernels, sibling_projections, stacked_gqa_attention, allocator. Each computes what the plain
    path computes; all are undone when training returns."""
    distributed: str = "ddp"
    """How several processes (torchrun, accelerate launch) share the work: ddp (each rank holds the
    whole 4-bit model, adapter gradients summed) or fsdp (FSDP2: every decoder layer, its 4-bit
    storage included, sharded across the ranks; docs/distributed.md). One process: no effect."""

    def _check(self) -> None:
        if self.max_steps is None and self.epochs is None:
            msg = "must be a positive integer, or null when train.epochs is set; got null"
            raise ConfigError(f"train.max_steps: {msg}")


@dataclass(frozen=True)
class MergeConfig(_Section):
    _section = "merge"
    after_train: bool = False
    """Merge into <output_dir>/merged as soon as training ends."""
    dtype: str = "auto"
    """Dtype of the merged model: bf16, fp16, fp32, or auto: the first of bf16, fp16, fp32 whose merged
    model passes the fidelity check (merge_report.json says which, and what each one tried scored).
    The fold itself always runs in fp32."""
    into: str = "dequantized"
    """dequantized: fold in fp32 into the dequantized base, save 16-bit; original: keep the base format
    (exact for QA-LoRA on int4/gguf, where only zero points/mins change)."""
    lm_head_dtype: str = "same"
    """Dtype of the output head in the merged model: same (the merge dtype), bf16, fp16 or fp32. A head
    tied to the input embeddings is one tensor with them, so they take its dtype too, unless
    `untie_embeddings`. A head in another dtype than the rest makes config.json record fp32, the one
    dtype in which transformers (which loads a model in a single dtype) reloads both exactly."""
    untie_embeddings: bool = False
    """Write a tied output head as its own tensor (config `tie_word_embeddings: false`), so that
    `lm_head_dtype` applies to the head alone; never done unless asked."""
    keep_lm_head_fp16: bool = False
    """The older spelling of `lm_head_dtype: fp16`; read as that (a config saved again says lm_head_dtype)."""

    def _check(self) -> None:
        if not self.keep_lm_head_fp16:
            return
        if self.lm_head_dtype not in ("same", "fp16"):
            raise ConfigError(f"merge.keep_lm_head_fp16: true means merge.lm_head_dtype: fp16, "
                              f"but merge.lm_head_dtype is {self.lm_head_dtype}; set only merge.lm_head_dtype")
        object.__setattr__(self, "lm_head_dtype", "fp16")  # one stated choice from here on
        object.__setattr__(self, "keep_lm_head_fp16", False)


@dataclass(frozen=True)
class Config:
    """A whole training config; its YAML form has one mapping per field, in this order."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"{name}: must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        method, kind = self.quant.method, self.adapter.kind
        if kind == "qalora" and method not in ("int4", "gguf"):
            raise ConfigError(
                f"adapter.kind: qalora needs a base format with per-group zero points or mins "
                f"(quant.method int4 or gguf), not quant.method {method}"
            )
        g, ag = self.quant.base_group_size, self.adapter.group_size
        if ag is not None and method in ("int4", "gguf") and ag % g:
            source = "quant.group_size" if method == "int4" else "the GGUF block size"
            raise ConfigError(f"adapter.group_size: must be a multiple of {source} {g}, got {ag}")

    @property
    def adapter_group_size(self) -> int | None:
        """QA-LoRA pooling width in effect: adapter.group_size, or the base format's group size."""
        return self.adapter.group_size if self.adapter.group_size is not None else self.quant.base_group_size


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "quant": QuantConfig, "adapter": AdapterConfig,
    "data": DataConfig, "train": TrainConfig, "merge": MergeConfig,
}  # fmt: skip


# --- value checks: key -> (predicate on the already type-checked value, what is allowed) ---------------

def _one_of(*choices: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in choices), "one of " + ", ".join(choices)


_POS_INT = (lambda v: v > 0), "a positive integer"
_OPT_POS_INT = (lambda v: v is None or v > 0), "null or a positive integer"
_FRACTION = (lambda v: 0 <= v < 1), "a number in [0, 1)"
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    **dict.fromkeys(("model.name", "data.path", "data.template", "train.output_dir"),
                    ((lambda v: v.strip() != ""), "a non-empty string")),
    **dict.fromkeys(("quant.group_size", "adapter.r", "data.max_length", "train.batch_size", "train.grad_accum",
                     "train.log_every"), _POS_INT),
    **dict.fromkeys(("adapter.group_size", "data.limit", "train.max_steps", "train.save_every",
                     "train.eval_every"), _OPT_POS_INT),
    **dict.fromkeys(("adapter.dropout", "data.val_fraction", "train.warmup_ratio"), _FRACTION),
    **dict.fromkeys(("data.shuffle_seed", "train.seed"), ((lambda v: v >= 0), "an integer >= 0")),
    **dict.fromkeys(("adapter.alpha", "train.lr"), ((lambda v: v > 0), "a number > 0")),
    "train.epochs": ((lambda v: v is None or v > 0), "null or a number > 0"),
    "train.max_grad_norm": ((lambda v: v is None or v > 0), "null (no clipping) or a number > 0"),
    "train.weight_decay": ((lambda v: v >= 0), "a number >= 0"),
    "model.dtype": _one_of(*DTYPES),
    "merge.dtype": _one_of("auto", *DTYPES),
    "quant.method": _one_of("nf4", "fp4", "int4", "gguf", "none"),
    "adapter.kind": _one_of("lora", "qalora", "dora", "vera"),
    "data.format": _one_of("auto", "alpaca", "chat", "prompt-completion", "text"),
    "train.schedule": _one_of("constant", "linear", "cosine"),
    "train.distributed": _one_of("ddp", "fsdp"),
    "train.optimizer": _one_of("adamw", "adamw8bit"),
    "merge.into": _one_of("dequantized", "original"),
    "merge.lm_head_dtype": _one_of("same", *DTYPES),
}


# --- types and parsing ---------------------------------------------------------------------------------

@cache
def _hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _show(value: Any) -> str:
    """A value as YAML would show it: null, true, 'text', [a, b]."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(list(value) if isinstance(value, tuple) else value)


def _as_float(value: Any) -> Any:
    if isinstance(value, str):  # YAML 1.1 reads 2.0e-4 as a float but 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            return value
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else value


_TYPES: dict[type, tuple[str, Callable[[Any], bool]]] = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),  # a bool is not an int
    float: ("a finite number", lambda v: isinstance(v, float)),
    str: ("a string", lambda v: isinstance(v, str)),
}


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """Check `value` against the annotation `hint`; return it normalised (int -> float, list -> tuple)."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional and value is None:
        return None
    if optional:
        (hint,) = [a for a in args if a is not type(None)]
    if str in args:  # adapter.targets, train.fast_paths: str | tuple[str, ...]
        return _fast_paths(key, value) if key == "train.fast_paths" else _targets(key, value)
    value = _as_float(value) if hint is float else value
    want, ok = _TYPES[hint]
    if not ok(value):
        raise ConfigError(f"{key}: must be {'null or ' if optional else ''}{want}, got {_show(value)}")
    return value


def _targets(key: str, value: Any) -> str | tuple[str, ...]:
    if value == "all-linear":
        return value
    names = value.split(",") if isinstance(value, str) else value
    if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
        names = tuple(n.strip() for n in names)
        if names and all(names):
            return names
    raise ConfigError(f"{key}: must be all-linear or a non-empty list of module names, got {_show(value)}")


FAST_PATHS = ("fused_kernels", "sibling_projections", "stacked_gqa_attention", "allocator")
"""The names `train.fast_paths` accepts (train/fast_paths.py applies them)."""


def _fast_paths(key: str, value: Any) -> str | tuple[str, ...]:
    """all | none | a list of FAST_PATHS names (a comma-separated string on the command line)."""
    if value in ("all", "none"):
        return value
    names = value.split(",") if isinstance(value, str) else value
    if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
        names = tuple(n.strip() for n in names if n.strip())
        unknown = [n for n in names if n not in FAST_PATHS]
        if not unknown:
            return names
        raise ConfigError(f"{key}: unknown fast path {unknown[0]!r}; use all, none or a list of {', '.join(FAST_PATHS)}")
    raise ConfigError(f"{key}: must be all, none or a list of {', '.join(FAST_PATHS)}, got {_show(value)}")


def _lookup(section: str, key: str | None = None) -> type:
    """The section class, after checking that `section` (and `key`, when given) exist."""
    cls, name = SECTIONS.get(section), section if key is None else f"{section}.{key}"
    if cls is None:
        near = [s + ("" if key is None else f".{key}") for s in difflib.get_close_matches(section, SECTIONS, n=1)]
        hint = f"; did you mean {near[0]}?" if near else ""
        raise ConfigError(f"{name}: unknown section {section!r}{hint} (sections: {', '.join(SECTIONS)})")
    if key is not None and key not in _hints(cls):
        near = [f"{section}.{k}" for k in difflib.get_close_matches(key, _hints(cls), n=1)]
        near = near or [f"{s}.{key}" for s, c in SECTIONS.items() if key in _hints(c)]
        hint = f"did you mean {near[0]}?" if near else f"{section} has {', '.join(_hints(cls))}"
        raise ConfigError(f"{name}: unknown key; {hint}")
    return cls


def _parse_override(item: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value), the value read with YAML scalar rules."""
    name, eq, text = item.partition("=")
    section, dot, key = name.strip().partition(".")
    if not (eq and dot and section and key):
        raise ConfigError(f"{item!r}: an override must look like section.key=value, e.g. train.lr=1e-3")
    hint = _hints(_lookup(section, key))[key]
    if hint is str or (key in ("targets", "fast_paths") and not text.lstrip().startswith("[")):
        return section, key, text  # as typed: `data.template=yes` is the string "yes", not true
    try:
        return section, key, yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"{section}.{key}: cannot read {text!r} as a YAML value") from None


def _mapping(name: str, value: Any, what: str) -> Mapping:
    value = {} if value is None else value  # an empty file or an empty `model:` section
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name}: must be a mapping of {what}, got {_show(value)}")
    return value


# --- public functions ----------------------------------------------------------------------------------

def config_from_dict(d: Mapping[str, Any]) -> Config:
    """Build a Config from {section: {key: value}}; sections and keys left out take their defaults."""
    sections = {}
    for section, body in _mapping("config", d, f"sections ({', '.join(SECTIONS)})").items():
        cls = _lookup(str(section))
        for key in _mapping(section, body, "keys"):
            _lookup(section, str(key))
        sections[section] = cls(**_mapping(section, body, "keys"))
    return Config(**sections)


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The config as plain YAML-ready data: every key (ALIASES aside), sections in order, lists as lists."""
    out: dict[str, dict[str, Any]] = {}
    for name in SECTIONS:
        values = {f.name: getattr(getattr(cfg, name), f.name) for f in fields(SECTIONS[name])
                  if f"{name}.{f.name}" not in ALIASES}
        out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    return out


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A new Config with `section.key=value` overrides applied in order (a later one wins).

    Every override is applied before any check runs, so `adapter.kind=qalora quant.method=int4` works on an
    nf4 config in either order.
    """
    changes: dict[str, dict[str, Any]] = {}
    for item in overrides:
        section, key, value = _parse_override(item)
        changes.setdefault(section, {})[key] = value
    if not changes:
        return cfg
    return replace(cfg, **{s: replace(getattr(cfg, s), **kv) for s, kv in changes.items()})


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (None: all defaults) and apply `section.key=value` overrides in order.

    File and overrides are merged before any value is checked, so an override can fix a bad file value.
    """
    raw: Any = None
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config file ({e.strerror or e})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    merged = dict(_mapping(str(path), raw, f"sections ({', '.join(SECTIONS)})"))
    for item in overrides:
        section, key, value = _parse_override(item)
        merged[section] = {**_mapping(section, merged.get(section), "keys"), key: value}
    return config_from_dict(merged)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (every key), atomically: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# Resolved qlorakit config: every key, defaults included.\n"
    text += yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    write_text_atomic(path, text)
