"""Config: defaults as DESIGN.md lists them, YAML + dotted overrides, one-line errors naming the dotted key."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from qlorakit.config import (
    AdapterConfig,
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)

# DESIGN.md "Training config", plus the keys the issues need (use_rslora, tensorboard, skip_nonfinite,
# allow_pickle_weights, untie_embeddings, distributed).
DESIGN_DEFAULTS = yaml.safe_load("""
model:   {name: smollm2, dtype: bf16, allow_pickle_weights: false}
quant:   {method: nf4, double_quant: true, group_size: 64, quantize_lm_head: false}
adapter: {kind: lora, r: 16, alpha: 32, dropout: 0.05, targets: all-linear, group_size: null, use_rslora: false}
data:    {path: data/train.jsonl, format: auto, template: auto, train_on_prompt: false,
          max_length: 512, packing: false, val_fraction: 0.0, limit: null, shuffle_seed: 42}
train:   {output_dir: runs/x, max_steps: 100, epochs: null, batch_size: 4, grad_accum: 1,
          lr: 2.0e-4, schedule: cosine, warmup_ratio: 0.03, max_grad_norm: 0.3,
          optimizer: adamw, weight_decay: 0.0, gradient_checkpointing: false, seed: 42,
          save_every: 50, log_every: 1, eval_every: null, resume: false,
          tensorboard: false, skip_nonfinite: false, fast_paths: all, distributed: ddp}
merge:   {after_train: false, dtype: auto, into: dequantized, lm_head_dtype: same, untie_embeddings: false}
""")


def _error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_match_design_table():
    d = config_to_dict(Config())
    assert list(d) == ["model", "quant", "adapter", "data", "train", "merge"]
    assert d == DESIGN_DEFAULTS  # same sections, same keys in each, same values
    for section, body in DESIGN_DEFAULTS.items():
        assert list(d[section]) == list(body), section  # the key order of the table
    assert load_config(None) == Config()


def test_partial_yaml_file_keeps_other_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("adapter:\n  r: 8\n  targets: [q_proj, v_proj]\ntrain:\n  lr: 1e-3\nmerge:\n")
    cfg = load_config(path)
    assert cfg.adapter.r == 8 and cfg.adapter.targets == ("q_proj", "v_proj")
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)  # YAML 1.1: "1e-3" is a str
    assert cfg.adapter.alpha == 32.0 and cfg.train.batch_size == 4 and cfg.merge == Config().merge


def test_empty_file_is_all_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_config(path) == Config()


@pytest.mark.parametrize(
    "override, attr, expected",
    [
        ("train.lr=1e-3", "train.lr", 1e-3),
        ("train.lr=2.0e-4", "train.lr", 2e-4),
        ("adapter.alpha=16", "adapter.alpha", 16.0),  # int accepted where a float is expected
        ("data.limit=null", "data.limit", None),
        ("data.limit=10", "data.limit", 10),
        ("train.resume=true", "train.resume", True),
        ("quant.double_quant=false", "quant.double_quant", False),
        ("train.max_grad_norm=null", "train.max_grad_norm", None),
        ("model.name=/models/my model", "model.name", "/models/my model"),
        ("data.template=yes", "data.template", "yes"),  # a string key keeps the text as typed
        ("adapter.targets=q_proj,v_proj", "adapter.targets", ("q_proj", "v_proj")),
        ("adapter.targets=[k_proj, o_proj]", "adapter.targets", ("k_proj", "o_proj")),
        ("adapter.targets=all-linear", "adapter.targets", "all-linear"),
        ("train.epochs=1.5", "train.epochs", 1.5),
    ],
)
def test_override_types(override, attr, expected):
    section, key = attr.split(".")
    value = getattr(getattr(load_config(None, [override]), section), key)
    assert value == expected and type(value) is type(expected)


def test_overrides_apply_in_order_and_after_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("adapter: {r: 0}\n")  # bad on its own; the override fixes it before any check
    cfg = load_config(path, ["adapter.r=4", "adapter.r=8"])
    assert cfg.adapter.r == 8


def test_apply_overrides_returns_new_config():
    base = Config()
    cfg = apply_overrides(base, ["train.max_steps=null", "train.epochs=2", "quant.method=int4"])
    assert cfg.train.max_steps is None and cfg.train.epochs == 2.0 and cfg.quant.method == "int4"
    assert base == Config() and apply_overrides(base, []) is base
    # order does not matter for cross-field checks: every override lands before checking
    qa = apply_overrides(base, ["adapter.kind=qalora", "quant.method=int4", "adapter.group_size=128"])
    assert qa.adapter.kind == "qalora" and qa.adapter_group_size == 128


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "train.lrr: unknown key; did you mean train.lr?"),
        ("adapter.rr=4", "adapter.rr: unknown key; did you mean adapter.r?"),
        ("train.dropout=0.1", "train.dropout: unknown key; did you mean adapter.dropout?"),
        ("trian.lr=1", "trian.lr: unknown section 'trian'; did you mean train.lr?"),
    ],
)
def test_unknown_key_suggests(override, message):
    assert _error([override]).startswith(message)


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_step: 10\n")
    with pytest.raises(ConfigError, match=r"^train\.max_step: unknown key; did you mean train\.max_steps\?"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^optim: unknown section"):
        config_from_dict({"optim": {}})


def test_malformed_override():
    assert "section.key=value" in _error(["train.lr"])
    assert "section.key=value" in _error(["lr=1"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("adapter.r=true", "adapter.r"),  # a bool is not an int
        ("adapter.r=1.5", "adapter.r"),
        ("adapter.r=abc", "adapter.r"),
        ("train.lr=fast", "train.lr"),
        ("train.lr=.nan", "train.lr"),
        ("train.resume=maybe", "train.resume"),
        ("train.batch_size=4.0", "train.batch_size"),
        ("adapter.targets=[1, 2]", "adapter.targets"),
        ("adapter.targets=[]", "adapter.targets"),
    ],
)
def test_wrong_type_names_key(override, key):
    assert _error([override]).startswith(f"{key}: must be ")


def test_wrong_type_in_yaml():
    with pytest.raises(ConfigError, match=r"^model\.name: must be a string, got 123$"):
        config_from_dict({"model": {"name": 123}})
    with pytest.raises(ConfigError, match=r"^train: must be a mapping of keys"):
        config_from_dict({"train": [1, 2]})


BAD_VALUES = [
    "model.dtype=int8", "quant.method=gptq", "quant.group_size=0", "adapter.kind=adalora", "adapter.r=0",
    "adapter.r=-1", "adapter.alpha=0", "adapter.dropout=1.0", "adapter.dropout=-0.1", "adapter.group_size=0",
    "data.format=csv", "data.template=", "data.max_length=0", "data.val_fraction=1", "data.val_fraction=-0.5",
    "data.limit=0", "train.epochs=0", "train.batch_size=0", "train.grad_accum=0", "train.lr=0", "train.lr=-1e-3",
    "train.schedule=step", "train.warmup_ratio=1", "train.max_grad_norm=0", "train.optimizer=sgd",
    "train.weight_decay=-0.1", "train.save_every=0", "train.log_every=0", "train.eval_every=0",
    "train.max_steps=0", "merge.dtype=fp8", "merge.into=gguf", "model.name=", "data.path= ",
]


@pytest.mark.parametrize("override", BAD_VALUES)
def test_bad_value_names_dotted_key(override):
    key = override.partition("=")[0]
    message = _error([override])
    assert re.match(rf"^{re.escape(key)}: must be .+, got .+$", message), message


def test_bad_value_message_shape():
    assert _error(["adapter.r=0"]) == "adapter.r: must be a positive integer, got 0"
    assert _error(["model.dtype=int8"]) == "model.dtype: must be one of bf16, fp16, fp32, got 'int8'"
    assert _error(["quant.method=int4", "quant.group_size=48"]).startswith("quant.group_size: must be 32, 64 or 128")


def test_max_steps_or_epochs():
    assert _error(["train.max_steps=null"]).startswith("train.max_steps: ")
    both = load_config(None, ["train.epochs=3"])  # both set: max_steps wins (documented on the field)
    assert both.train.max_steps == 100 and both.train.epochs == 3.0
    only_epochs = load_config(None, ["train.max_steps=null", "train.epochs=0.5"])
    assert only_epochs.train.max_steps is None and only_epochs.train.epochs == 0.5


@pytest.mark.parametrize("method", ["nf4", "fp4", "none"])
def test_qalora_refused_without_zero_points(method):
    message = _error(["adapter.kind=qalora", f"quant.method={method}"])
    assert message.startswith("adapter.kind: qalora needs a base format with per-group zero points or mins")
    assert "int4" in message and "gguf" in message and method in message


def test_qalora_group_size_must_be_multiple_of_base():
    ok = load_config(None, ["adapter.kind=qalora", "quant.method=int4", "quant.group_size=32", "adapter.group_size=96"])
    assert ok.adapter_group_size == 96
    assert load_config(None, ["adapter.kind=qalora", "quant.method=gguf"]).adapter_group_size == 32
    message = _error(["adapter.kind=qalora", "quant.method=int4", "quant.group_size=64", "adapter.group_size=96"])
    assert message == "adapter.group_size: must be a multiple of quant.group_size 64, got 96"
    message = _error(["adapter.kind=qalora", "quant.method=gguf", "adapter.group_size=48"])
    assert message.startswith("adapter.group_size: must be a multiple of") and "32" in message


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  name: smollm2\nadapter:\n  r: [16\n  alpha: 32\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert re.match(rf"^{re.escape(str(path))}:\d+: invalid YAML", message), message
    line = int(message[len(str(path)) + 1 :].split(":")[0])
    assert 4 <= line <= 6  # PyYAML reports where it noticed, at or just after the unclosed bracket


def test_file_not_a_mapping_or_missing(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: must be a mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_save_load_round_trip(tmp_path):
    cfg = load_config(
        None,
        ["adapter.kind=qalora", "quant.method=int4", "adapter.targets=q_proj,v_proj", "train.lr=1e-5",
         "train.max_steps=null", "train.epochs=2", "data.limit=7", "train.max_grad_norm=null",
         "merge.after_train=true", "adapter.use_rslora=true"],
    )
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    written = yaml.safe_load(path.read_text())
    assert list(written) == ["model", "quant", "adapter", "data", "train", "merge"]
    assert written["adapter"]["targets"] == ["q_proj", "v_proj"]  # a YAML list, not a Python tuple tag
    assert sum(len(v) for v in written.values()) == sum(len(v) for v in DESIGN_DEFAULTS.values())
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # the temp file is gone
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert isinstance(config_to_dict(cfg)["adapter"]["targets"], list)


def test_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.adapter = AdapterConfig(r=4)  # type: ignore[misc]


def test_direct_construction_is_checked_and_normalised():
    assert AdapterConfig(targets=["q_proj"]).targets == ("q_proj",)
    assert AdapterConfig(alpha=8).alpha == 8.0 and isinstance(AdapterConfig(alpha=8).alpha, float)
    with pytest.raises(ConfigError, match=r"^adapter\.r: "):
        AdapterConfig(r=0)


def test_keep_lm_head_fp16_is_read_as_lm_head_dtype_fp16(tmp_path):
    cfg = load_config(None, ["merge.keep_lm_head_fp16=true"])
    assert cfg.merge.lm_head_dtype == "fp16" and not cfg.merge.keep_lm_head_fp16
    assert "keep_lm_head_fp16" not in config_to_dict(cfg)["merge"]  # a saved config states the one choice
    path = tmp_path / "c.yaml"
    path.write_text("merge:\n  keep_lm_head_fp16: true\n")
    assert load_config(path) == cfg
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    message = _error(["merge.keep_lm_head_fp16=true", "merge.lm_head_dtype=fp32"])
    assert message == ("merge.keep_lm_head_fp16: true means merge.lm_head_dtype: fp16, but merge.lm_head_dtype "
                       "is fp32; set only merge.lm_head_dtype")
    assert _error(["merge.lm_head_dtype=fp8"]) == "merge.lm_head_dtype: must be one of same, bf16, fp16, fp32, got 'fp8'"


def test_keys_an_adapter_kind_does_not_use_are_refused():
    assert _error(["adapter.kind=vera", "adapter.use_rslora=true"]).startswith("adapter.use_rslora: VeRA has no alpha / r scale")
    assert _error(["adapter.group_size=64"]) == ("adapter.group_size: the QA-LoRA pooling width, but adapter.kind is lora; "
                                                 "leave it null or use adapter.kind qalora")
    assert load_config(None, ["adapter.kind=dora"]).adapter.kind == "dora"
    assert load_config(None, ["adapter.kind=vera", "adapter.r=256"]).adapter.r == 256
