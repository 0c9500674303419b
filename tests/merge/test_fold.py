"""merge_to_dense: the merged plain model computes what the quantized base + adapter computed."""

import pytest
import torch
from torch import nn

from qlorakit.adapters.inject import adapter_layers
from qlorakit.merge.fold import MergeError, fold_layer, merge_to_dense
from qlorakit.quant.linear import QuantLinear
from tests.conftest import build_tiny
from tests.merge.conftest import CONFIGS, adapter_model, logits

TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}  # max |logit diff|


def _is_conv1d(module):
    return type(module).__name__ == "Conv1D"


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merged_logits_equal_adapter_model(arch, dtype, random_ids):
    model = adapter_model(CONFIGS[arch]())
    merged = merge_to_dense(model, dtype)
    reference, candidate = logits(model, random_ids), logits(merged, random_ids)
    assert (reference - candidate).abs().max() < TOLERANCE[dtype]
    assert torch.equal(reference.argmax(-1), candidate.argmax(-1))  # greedy agreement 1.0
    assert {p.dtype for p in merged.parameters()} == {dtype}


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_merged_model_has_the_plain_architecture(arch):
    config = CONFIGS[arch]()
    merged = merge_to_dense(adapter_model(config), torch.bfloat16)
    fresh = build_tiny(config)
    assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in fresh.state_dict().items()}
    assert type(merged) is type(fresh)
    linear_types = {type(m).__name__ for m in merged.modules() if isinstance(m, nn.Linear) or _is_conv1d(m) or isinstance(m, QuantLinear)}
    assert linear_types <= {"Linear", "Conv1D"}
    assert not any("lora_" in k or "qweight" in k or "base_layer" in k for k in merged.state_dict())
    assert getattr(merged.config, "quantization_config", None) is None
    tied = bool(config.tie_word_embeddings)
    assert (merged.get_output_embeddings().weight is merged.get_input_embeddings().weight) == tied


def test_conv1d_weights_are_stored_in_out_again():
    model = adapter_model(CONFIGS["gpt2"]())
    merged = merge_to_dense(model, torch.float32)
    name = "transformer.h.0.attn.c_attn"
    layer = model.get_submodule(name)
    expected = layer.base_layer.dequantize_weight(torch.float32) + layer.delta_weight()  # (out, in)
    conv = merged.get_submodule(name)
    assert _is_conv1d(conv) and conv.weight.shape == (layer.in_features, layer.out_features)
    torch.testing.assert_close(conv.weight, expected.t(), rtol=0, atol=0)
    torch.testing.assert_close(conv.bias, layer.base_layer.bias, rtol=0, atol=0)


def test_input_model_is_not_modified(random_ids):
    model = adapter_model(CONFIGS["llama-tied"]())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = logits(model, random_ids)
    merge_to_dense(model, torch.bfloat16, lm_head_dtype=torch.float16)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(logits(model, random_ids), expected)
    assert len(adapter_layers(model)) == 14


def test_qalora_on_int4_merges_exactly(random_ids):
    model = adapter_model(CONFIGS["llama"](), fmt="int4", kind="qalora", group_size=64)
    merged = merge_to_dense(model, torch.float32)
    assert (logits(model, random_ids) - logits(merged, random_ids)).abs().max() < 1e-4


def test_into_original_folds_into_the_16bit_weights():
    config = CONFIGS["gpt2"]()
    original = {k: v.clone() for k, v in build_tiny(config).state_dict().items()}
    model = adapter_model(config)
    merged = merge_to_dense(model, torch.float32, original_weights=original)
    for name, layer in adapter_layers(model).items():
        expected = original[f"{name}.weight"].t() + layer.delta_weight()  # Conv1D (in, out) -> (out, in)
        torch.testing.assert_close(merged.get_submodule(name).weight, expected.t(), rtol=0, atol=0)
        # ... which differs from the dequantized merge by the quantization error.
        folded, _, _ = fold_layer(layer)
        assert not torch.equal(folded, expected)
    with pytest.raises(MergeError, match=r"transformer.h.0.attn.c_attn.weight: not in the original weights"):
        merge_to_dense(model, torch.float32, original_weights={"transformer.wte.weight": original["transformer.wte.weight"]})


def test_fp16_head_in_a_bf16_merge_untied(random_ids):
    model = adapter_model(CONFIGS["llama"]())
    merged = merge_to_dense(model, torch.bfloat16, lm_head_dtype=torch.float16)
    assert merged.lm_head.weight.dtype == torch.float16
    assert {p.dtype for n, p in merged.named_parameters() if n != "lm_head.weight"} == {torch.bfloat16}
    plain = merge_to_dense(model, torch.bfloat16)
    reference = logits(model, random_ids)
    assert (reference - logits(merged, random_ids)).abs().max() < TOLERANCE[torch.bfloat16]
    # The head weights themselves are rounded to fp16, closer to the fp32 merge than bf16 is.
    exact = model.lm_head.weight.float()
    assert (merged.lm_head.weight.float() - exact).abs().max() < (plain.lm_head.weight.float() - exact).abs().max()


def test_fp32_head_in_a_bf16_merge_is_the_unrounded_head(random_ids):
    model = adapter_model(CONFIGS["llama"]())
    merged = merge_to_dense(model, torch.bfloat16, lm_head_dtype=torch.float32)
    assert torch.equal(merged.lm_head.weight, model.lm_head.weight.float())  # the head is not rounded at all
    assert {p.dtype for n, p in merged.named_parameters() if n != "lm_head.weight"} == {torch.bfloat16}
    out = logits(merged, random_ids)  # bf16 hidden states cross into the fp32 head
    assert (logits(model, random_ids) - out).abs().max() < TOLERANCE[torch.bfloat16]


def test_tied_head_keeps_the_shared_tensor_in_the_head_dtype_and_tied(random_ids):
    """A tied head is one tensor with the embeddings: unless asked to untie, it stays one tensor."""
    model = adapter_model(CONFIGS["llama-tied"]())
    merged = merge_to_dense(model, torch.bfloat16, lm_head_dtype=torch.float16)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert merged.lm_head.weight.dtype == torch.float16 and merged.config.tie_word_embeddings
    body = {p.dtype for n, p in merged.named_parameters() if n != "model.embed_tokens.weight"}
    assert body == {torch.bfloat16}
    assert (logits(model, random_ids) - logits(merged, random_ids)).abs().max() < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("arch", ["llama-tied", "gpt2"])
def test_untie_embeddings_gives_the_head_its_own_tensor_and_dtype(arch, random_ids):
    model = adapter_model(CONFIGS[arch]())
    merged = merge_to_dense(model, torch.bfloat16, lm_head_dtype=torch.float32, untie_embeddings=True)
    head, embed = merged.get_output_embeddings().weight, merged.get_input_embeddings().weight
    assert head is not embed and head.untyped_storage().data_ptr() != embed.untyped_storage().data_ptr()
    assert head.dtype == torch.float32 and embed.dtype == torch.bfloat16
    assert not merged.config.tie_word_embeddings
    source = model.get_input_embeddings().weight
    assert torch.equal(head, source.float()) and torch.equal(embed, source.to(torch.bfloat16))
    assert (logits(model, random_ids) - logits(merged, random_ids)).abs().max() < TOLERANCE[torch.bfloat16]
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # the input stays tied
    # Untied in the same dtype: still two tensors, equal.
    same = merge_to_dense(model, torch.bfloat16, untie_embeddings=True)
    assert same.get_output_embeddings().weight is not same.get_input_embeddings().weight
    assert torch.equal(same.get_output_embeddings().weight, same.get_input_embeddings().weight)


def test_head_dtype_equal_to_the_merge_dtype_is_a_plain_merge():
    model = adapter_model(CONFIGS["llama"]())
    a, b = merge_to_dense(model, torch.float16, lm_head_dtype=torch.float16), merge_to_dense(model, torch.float16)
    assert {p.dtype for p in a.parameters()} == {torch.float16}
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not a.lm_head._forward_pre_hooks  # no dtype boundary to cross


def test_disabled_adapter_is_refused():
    model = adapter_model(CONFIGS["llama"]())
    model.model.layers[1].mlp.up_proj.disabled = True
    with pytest.raises(MergeError, match=r"model.layers.1.mlp.up_proj: the adapter is disabled"):
        merge_to_dense(model, torch.bfloat16)


def test_quantized_layers_without_adapters_are_dequantized(random_ids):
    from qlorakit.quant.registry import get_format
    from qlorakit.quant.replace import quantize_model

    model = build_tiny(CONFIGS["gpt2"]())
    quantize_model(model, get_format("nf4"), torch.float32, progress=False)
    merged = merge_to_dense(model, torch.float32)
    assert (logits(model, random_ids) - logits(merged, random_ids)).abs().max() < 1e-4
