"""Dequantize-and-fold merge: a quantized base plus adapters -> a plain transformers model.

For every adapted layer (seed 000's fix for peft's re-quantizing `merge_and_unload`):

    W_merged = cast_dtype( W_base + ΔW ),   W_base = dequantize(W_q) in fp32 (or the original
                                             16-bit weight, `--into original`),
                                             ΔW = s · B A (LoraLinear.delta_weight(), fp32)

The sum is formed in fp32 and rounded once, to the requested dtype, so the only loss is that
single rounding. QuantLinear layers without adapters are dequantized; every other tensor
(embeddings, norms, biases) is cast. The result is a new model of the source's architecture:
nn.Linear / GPT-2 Conv1D layers with exactly the state-dict names and layouts of a model built
from the same config (Conv1D weights back to (in_features, out_features)), tied embeddings tied
(unless asked to untie them). The output head may have a dtype of its own (`lm_head_dtype`).
The input model is never modified.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from qlorakit.adapters.dora import DoraLinear
from qlorakit.adapters.lora import LoraLinear
from qlorakit.models.skeleton import clean_config
from qlorakit.quant.linear import QuantLinear, dense_weight_of
from qlorakit.quant.replace import output_head_names

class MergeError(ValueError):
    """The model cannot be merged as asked (missing original weights, disabled adapter, ...)."""


def base_weight(module: nn.Module, original_weight: Tensor | None = None) -> tuple[Tensor, Tensor | None, str]:
    """(W₀ in fp32 as (out_features, in_features), bias, source layout) of one layer.

    `module` is a LoraLinear (over QuantLinear, nn.Linear or Conv1D) or a bare QuantLinear; W₀ is
    its dequantized (or dense) base weight, or `original_weight` when given. `original_weight` is
    in the source layout (Conv1D: (in_features, out_features)), as in the original state dict.
    """
    base = module.base_layer if isinstance(module, LoraLinear) else module
    weight, layout = dense_weight_of(base)  # (out, in); QuantLinear: dequantized, fp32
    if original_weight is not None:
        original = original_weight.t() if layout == "conv1d" else original_weight  # (in, out) -> (out, in)
        if tuple(original.shape) != tuple(weight.shape):
            raise MergeError(f"original weight has shape {tuple(original_weight.shape)}, the layer needs {tuple(weight.shape)}")
        weight = original.to(weight.device)
    return weight.float(), base.bias, layout


@torch.no_grad()
def fold_layer(module: nn.Module, original_weight: Tensor | None = None) -> tuple[Tensor, Tensor | None, str]:
    """(W₀ + ΔW in fp32 as (out_features, in_features), bias, source layout); see `base_weight`."""
    if original_weight is not None and isinstance(module, DoraLinear):
        raise MergeError("--into original: a DoRA update rescales the rows of the weight it was trained on (the "
                         "dequantized base), so it does not carry over to the original weights; use --into dequantized")
    weight, bias, layout = base_weight(module, original_weight)
    if isinstance(module, LoraLinear):
        delta = module.delta_weight().to(weight.device)  # (out, in) fp32, our own tensor
        weight = torch.add(weight, delta, out=delta)  # W₀ + ΔW into ΔW's memory: one fresh 4·out·in bytes, not two
    return weight, bias, layout


def merge_to_dense(
    model: nn.Module,
    dtype: torch.dtype,
    lm_head_dtype: torch.dtype | None = None,
    original_weights: dict[str, Tensor] | None = None,
    untie_embeddings: bool = False,
) -> nn.Module:
    """A new plain transformers model with every adapter folded in; see the module docstring.

    Args:
        model: a transformers causal LM with QuantLinear / LoraLinear / QALoraLinear layers.
        dtype: dtype of the merged weights (torch.bfloat16, torch.float16, torch.float32).
        lm_head_dtype: dtype of the output head (None: `dtype`), e.g. fp16 in a bf16 merge (10
            mantissa bits instead of 7, same size) or fp32. A head tied to the input embeddings is
            one tensor with them: the embeddings take this dtype too and stay tied, unless
            `untie_embeddings`. When the head's dtype differs from `dtype`, the returned model
            carries forward hooks that cast activations across the boundary (hooks are not saved;
            write.py records the dtype transformers reloads such a model in).
        original_weights: state-dict name -> original 16-bit tensor (`--into original`); these
            replace the dequantized weights (every quantized layer must have one) and any other
            tensor of the same name.
        untie_embeddings: write a tied head as a tensor of its own (config.tie_word_embeddings
            false), so that the embeddings keep `dtype`; a no-op for an untied model.

    Returns:
        The merged model on the source's device, in eval mode.

    Raises:
        MergeError: a quantized layer has no original weight, or an adapter is disabled.
    """
    head_dtype = lm_head_dtype or dtype
    original_weights = original_weights or {}
    heads = output_head_names(model)
    head = model.get_output_embeddings()
    untie = untie_embeddings and _tied(model)
    head_tensor_ids = set()  # a dense head's tensors (and the embedding, when tied: the same tensor)
    if head is not None and not isinstance(head, (LoraLinear, QuantLinear)):
        head_tensor_ids = {id(t) for t in (head.weight, getattr(head, "bias", None)) if t is not None}
    device = next(model.parameters()).device

    state: dict[str, Tensor] = {}
    casts: dict[tuple[int, bool], Tensor] = {}  # (id(source tensor), of the untied head) -> its copy: tied tensors stay one

    def cast(tensor: Tensor, target: torch.dtype, own_copy: bool = False) -> Tensor:
        """A copy (never shared with the input model) in `target` if floating; `own_copy`: not
        shared with another name's copy of the same tensor either (the head, untied)."""
        if (id(tensor), own_copy) not in casts:
            casts[id(tensor), own_copy] = tensor.detach().to(target if tensor.is_floating_point() else tensor.dtype, copy=True)
        return casts[id(tensor), own_copy]

    folded_prefix = None
    for name, module in model.named_modules():
        if folded_prefix is not None and name.startswith(folded_prefix):
            continue  # base_layer / lora_A / lora_B of a layer already folded (named_modules is depth-first)
        target = head_dtype if name in heads else dtype
        if isinstance(module, (LoraLinear, QuantLinear)):
            folded_prefix = name + "."
            if isinstance(module, LoraLinear) and module.disabled:
                raise MergeError(f"{name}: the adapter is disabled; enable it before merging (a merge folds every adapter)")
            quantized = isinstance(module.base_layer if isinstance(module, LoraLinear) else module, QuantLinear)
            original = original_weights.get(f"{name}.weight")
            if original is None and quantized and original_weights:
                raise MergeError(f"{name}.weight: not in the original weights; --into original needs every quantized layer's 16-bit weight")
            weight, bias, layout = fold_layer(module, original)
            if layout == "conv1d":
                weight = weight.t()  # (out, in) -> (in, out), Conv1D's layout
            state[f"{name}.weight"] = weight.to(target).contiguous()
            if bias is not None:
                state[f"{name}.bias"] = cast(original_weights.get(f"{name}.bias", bias), target)
            continue
        prefix = f"{name}." if name else ""
        for key, tensor in module._parameters.items():
            if tensor is not None:
                full = prefix + key
                in_head = name in heads if untie else id(tensor) in head_tensor_ids
                state[full] = cast(original_weights.get(full, tensor), head_dtype if in_head else dtype, untie and in_head)
        for key, tensor in module._buffers.items():
            if tensor is not None and key not in module._non_persistent_buffers_set:
                state[prefix + key] = cast(tensor, dtype)

    merged = _build_plain_model(model, dtype, state, untie)
    if head_dtype != dtype:
        _add_dtype_boundary_hooks(merged, dtype)
    return merged.to(device).eval()


def _build_plain_model(model: nn.Module, dtype: torch.dtype, state: dict[str, Tensor], untie: bool = False) -> nn.Module:
    """Instantiate the source's architecture on the meta device and assign `state` into it
    (`untie`: with config.tie_word_embeddings false, the head a tensor of its own)."""
    from qlorakit.models.load import build_skeleton

    config = clean_config(model.config)
    config.dtype = dtype
    if untie:
        config.tie_word_embeddings = False
    skeleton = build_skeleton(config, dtype, device="meta")
    expected = set(skeleton.state_dict())
    tied = _tied(model) and not untie
    if bool(getattr(config, "tie_word_embeddings", False)) != tied:
        raise MergeError("config.tie_word_embeddings does not match the model: is the tied output head quantized or adapted?")
    missing = expected - set(state)
    if tied:
        missing -= {f"{name}.weight" for name in output_head_names(skeleton)}
    unexpected = set(state) - expected
    if missing or unexpected:
        raise MergeError(
            f"merged tensors do not match {type(skeleton).__name__}: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    skeleton.load_state_dict(state, strict=False, assign=True)
    if tied:
        skeleton.tie_weights()
        if skeleton.get_output_embeddings().weight is not skeleton.get_input_embeddings().weight:
            raise MergeError("the merged output head is no longer tied to the input embeddings")
    if getattr(model, "generation_config", None) is not None:
        skeleton.generation_config = copy.deepcopy(model.generation_config)
    return skeleton


def _tied(model: nn.Module) -> bool:
    """Whether the output head shares its weight with the input embeddings (a quantized head never does)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    head_weight = getattr(head, "weight", None)
    return head_weight is not None and head_weight is getattr(embed, "weight", None)


def _cast_input_to_weight_dtype(module: nn.Module, args: tuple) -> tuple:
    return (args[0].to(module.weight.dtype),) + tuple(args[1:])


def _make_output_cast(reference: Tensor):
    """A forward hook casting the output to `reference`'s dtype at call time (a parameter of the
    body, so that `computing_in` moves the boundary with it)."""

    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return output.to(reference.dtype)

    return hook


def _add_dtype_boundary_hooks(model: nn.Module, dtype: torch.dtype) -> None:
    """A head in a dtype of its own: hidden states enter the head in its dtype; a tied embedding
    (the head's tensor, so in its dtype) hands the body `dtype`. Only the in-memory model needs
    these: transformers reloads such a model in one dtype (write.py)."""
    head = model.get_output_embeddings()
    head.register_forward_pre_hook(_cast_input_to_weight_dtype)
    embed = model.get_input_embeddings()
    if embed.weight.dtype != dtype:
        body = next(p for p in model.parameters() if p.is_floating_point() and p is not embed.weight and p.dtype == dtype)
        embed.register_forward_hook(_make_output_cast(body))
