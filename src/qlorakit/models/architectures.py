"""Facts about transformers' model classes that more than one part of qlorakit relies on."""

from __future__ import annotations

PLAIN_HEAD_MODELS = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                               "Phi3ForCausalLM", "GPT2LMHeadModel"})
"""Classes whose forward computes `logits = lm_head(base_model(...).last_hidden_state)` and nothing
else (no logit softcapping, no scaling): the loss can then read the last hidden state and run the
head in chunks (train/loss.py), and the plan counts its memory that way (plan/shapes.py)."""
