"""`qlorakit plan`'s formulas against hand-computed bytes, its --json shape, errors and advice."""

import dataclasses
import json

import pytest

from qlorakit.models.load import load_config
import yaml
from transformers import LlamaConfig

from qlorakit.config import config_from_dict
from qlorakit.plan.estimate import activation_bytes, estimate, quantized_bytes
from qlorakit.plan.report import parse_memory, plan_config
from qlorakit.plan.shapes import model_shapes

# hidden 576, intermediate 1536, 3 heads of 192 / 1 KV head, 2 layers, vocab 1000, untied head
SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=3,
             num_key_value_heads=1, vocab_size=1000, tie_word_embeddings=False)


@pytest.fixture
def config_dir(tmp_path):
    """A directory with only config.json: all plan needs."""
    LlamaConfig(**SHAPE).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def _cfg(model_dir, **train):
    return config_from_dict({"model": {"name": str(model_dir), "dtype": "bf16"},
                             "quant": {"method": "nf4", "double_quant": True, "group_size": 64},
                             "adapter": {"r": 8, "dropout": 0.0}, "data": {"max_length": 128},
                             "train": {"batch_size": 2, **train}})


def test_nf4_double_quant_bytes_of_one_layer(config_dir):
    shapes = model_shapes(_cfg(config_dir))
    one = [s for s in shapes.quantized if s[1:] == (576, 576)][:1]  # a q_proj: 331,776 weights
    shapes.quantized = one
    # codes 331,776 / 2 = 165,888; 5,184 blocks of 64 -> 5,184 uint8 absmax; 21 nested blocks of 256
    # -> 21 fp32 scales (84); the 256-entry fp32 code (1,024) and one fp32 offset (4).
    assert quantized_bytes(shapes, 64, True) == {"nf4+dq": 165_888 + 5_184 + 84 + 1_024 + 4}
    assert quantized_bytes(shapes, 64, False) == {"nf4": 165_888 + 5_184 * 4}  # fp32 absmax per block


def test_adapter_gradient_and_adamw_bytes(config_dir):
    cfg = _cfg(config_dir)
    plan = estimate(cfg, model_shapes(cfg))
    kv = 192  # 1 KV head of head_dim 576 / 3
    per_layer = 8 * ((576 + 576) * 2 + (576 + kv) * 2 + (576 + 1536) * 2 + (1536 + 576))  # q,o; k,v; gate,up; down
    assert plan.trainable_parameters == 2 * per_layer
    assert plan.parts["adapters"] == plan.parts["gradients"] == 4 * 2 * per_layer
    assert plan.parts["optimizer"] == 8 * 2 * per_layer  # two fp32 moments
    assert estimate(_cfg(config_dir, optimizer="adamw8bit"), model_shapes(cfg)).parts["optimizer"] == 2 * 2 * per_layer
    # 16-bit rest: embeddings and head 1000 x 576 each, 5 norms of 576, in bf16
    assert plan.parts["dense_weights"] == 2 * (2 * 1000 * 576 + 5 * 576)


def test_activations_hand_computed_and_checkpointing_saves(config_dir):
    cfg = _cfg(config_dir)
    shapes = model_shapes(cfg)
    n, e = 2 * 128, 2
    layer = n * e * (5 * 576 + 2 * 192 + 3 * 1536) + n * 4 * 8 * 7 + 4 * 2 * 3 * 128
    assert activation_bytes(shapes, 2, 128, e, 8, 0.0, False) == 2 * layer + 2 * n * 576 * e
    assert activation_bytes(shapes, 2, 128, e, 8, 0.0, True) == 2 * n * 576 * e + layer + 2 * n * 576 * e


@pytest.mark.parametrize("batch, seq, vocab, layer, loss", [
    # N = 256 tokens, e = 2: layer 256·2·(5·576 + 2·192 + 3·1536) + 256·4·8·7 + 4·2·3·128 = 4,090,880;
    # loss 256 rows of 49,152 logits in bf16 plus their fp32 up-cast, 256·49,152·(2 + 4), + the saved
    # (256, 576) bf16 gradient = 75,792,384: the loss is the larger.
    (2, 128, 49152, 4_090_880, 75_792_384),
    # N = 16,384: layer 16,384·2·7,872 + 16,384·4·56 + 4·16·3·1,024 = 261,816,320; loss
    # 256·1,000·6 + 16,384·576·2 = 20,410,368: the rebuilt layer is the larger.
    (16, 1024, 1000, 261_816_320, 20_410_368),
])
def test_checkpointing_step_holds_the_larger_of_rebuilt_layer_and_loss(tmp_path, batch, seq, vocab, layer, loss):
    """With checkpointing the step keeps each layer's (N, h) input (2 layers, plus the final norm's
    input and output: 4·N·576·2 bytes) and rebuilds one layer in backward, after the loss's logits
    blocks are gone: it holds max(rebuilt layer, loss) on top of the inputs, never their sum."""
    LlamaConfig(**{**SHAPE, "vocab_size": vocab}).save_pretrained(tmp_path / "model")
    cfg = _cfg(tmp_path / "model", gradient_checkpointing=True, batch_size=batch)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_length=seq))
    plan = estimate(cfg, model_shapes(cfg), device="cuda")
    inputs = 4 * batch * seq * 576 * 2
    assert plan.parts["activations"] == inputs
    assert plan.parts["loss"] == loss
    assert plan.parts["loss"] + plan.parts["recompute"] == max(layer, loss)
    assert plan.activations_with_checkpointing == inputs + layer


def test_parts_equal_the_tensors_of_a_real_tiny_model(config_dir):
    """The plan's weights, adapters, gradients and AdamW state against the bytes of the tensors
    qlorakit builds for the same model: quantized with nf4 + double quant, LoRA r=8 on every linear
    layer, one optimizer step taken."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlorakit.adapters.inject import add_adapters
    from qlorakit.quant.linear import QuantLinear
    from qlorakit.quant.registry import format_for_config
    from qlorakit.quant.replace import quantize_model
    from qlorakit.train.optim import build_optimizer

    cfg = _cfg(config_dir)
    plan = estimate(cfg, model_shapes(cfg))
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE), dtype=torch.bfloat16)
    quantize_model(model, format_for_config("nf4", 64, True), torch.bfloat16, progress=False)
    add_adapters(model, "all-linear", r=8, alpha=16)

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert len(quantized) == 14 and plan.trainable_parameters == sum(p.numel() for p in trainable)
    assert plan.parts["quantized_weights"] == nbytes(b for m in quantized for b in m.buffers())
    assert plan.parts["dense_weights"] == nbytes(frozen)  # embeddings, head, norms in bf16
    assert plan.parts["adapters"] == plan.parts["gradients"] == nbytes(trainable)  # fp32 adapters, fp32 gradients

    optimizer = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.0)
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    moments = [t for state in optimizer.state.values() for name, t in state.items() if name != "step"]
    assert plan.parts["optimizer"] == nbytes(moments)


def test_fits_and_advice(config_dir):
    cfg = _cfg(config_dir)
    big = plan_config(cfg, gpu_memory=80 * 2**30)
    assert big.fits is True and big.advice == []
    small = plan_config(cfg, gpu_memory=big.peak_bytes - 1)
    assert small.fits is False and small.advice
    saves = [a["saves_bytes"] for a in small.advice]
    assert saves == sorted(saves, reverse=True) and min(saves) > 0
    assert any("gradient_checkpointing" in a["change"] for a in small.advice)
    ddp = plan_config(cfg, gpu_memory=big.peak_bytes, processes=2)
    fsdp = plan_config(cfg, gpu_memory=big.peak_bytes, processes=2, fsdp=True)
    assert ddp.peak_bytes == big.peak_bytes  # data parallel divides nothing per device
    assert fsdp.parts["optimizer"] == big.parts["optimizer"] // 2


def test_fsdp_divides_what_train_distributed_fsdp_shards(config_dir):
    """The decoder layers' 4-bit weights, adapters, gradients and optimizer are split; the dense
    embeddings and head stay whole (train/fsdp.py); two gathered layers are added."""
    cfg = _cfg(config_dir)
    one = plan_config(cfg)
    two = plan_config(cfg, processes=2, fsdp=True)
    for part in ("quantized_weights", "adapters", "gradients", "optimizer"):
        assert two.parts[part] == one.parts[part] // 2, part
    assert two.parts["dense_weights"] == one.parts["dense_weights"] > 0
    layers = load_config(config_dir).num_hidden_layers
    trainable = one.parts["adapters"]  # fp32: 4 bytes per trainable parameter
    assert two.parts["gathered_layers"] == 2 * (one.parts["quantized_weights"] + trainable) // layers
    assert "gathered_layers" not in plan_config(cfg, processes=2).parts


@pytest.mark.parametrize("text, expected", [("24GiB", 24 * 2**30), ("80GB", 80 * 10**9), ("1.5 gib", int(1.5 * 2**30))])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


def test_json_output_and_one_line_errors(cli, config_dir, tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": str(config_dir)}, "train": {"batch_size": 2}}))
    out = cli("plan", path, "data.max_length=256", "--gpu-memory", "1GiB", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)  # exactly one JSON object
    assert plan["peak_bytes"] == sum(plan["parts"].values()) and plan["max_length"] == 256
    assert {"quantized_weights", "dense_weights", "adapters", "optimizer", "gradients", "activations", "loss",
            "framework"} <= plan["parts"].keys()
    assert plan["fits"] is True and plan["device"] == "cuda"
    bad = cli("plan", path, "--gpu-memory", "24XB")
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "qlorakit plan: error: --gpu-memory: cannot read '24XB'; write a size such as 24GiB, 80GB or 16000MiB"], bad.stderr
    bad = cli("plan", path, "train.batch_sise=2")
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "qlorakit plan: error: train.batch_sise: unknown key; did you mean train.batch_size?"], bad.stderr
