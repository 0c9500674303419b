"""Fidelity report: figures on identical, merged and damaged models; the refusal of an unfaithful merge."""

import copy
import json

import pytest
import torch

from qlorakit.generation import chat_prompt_ids, user_turn
from qlorakit.merge.fidelity import (
    DEFAULT_PROBES,
    ProbeOutputs,
    UnfaithfulMergeError,
    check_faithful,
    check_probes,
    fidelity_report,
    run_probes,
    probe_set,
    verify_batch,
)
from qlorakit.merge.fold import merge_to_dense
from tests.merge.conftest import CONFIGS, adapter_model

PROMPTS = ["What day was I born?", *DEFAULT_PROBES[:3]]


def test_identical_models_give_zero_difference(tiny_tokenizer):
    model = merge_to_dense(adapter_model(CONFIGS["llama"]()), torch.float32)
    report = fidelity_report(model, copy.deepcopy(model), tiny_tokenizer, PROMPTS, max_new_tokens=8)
    assert report.max_abs_logit_diff == 0.0 and report.mean_kl == 0.0
    assert report.greedy_token_agreement == 1.0 and report.generations_equal
    assert len(report.rows) == len(PROMPTS) and all(row.generation_equal for row in report.rows)
    assert report.positions == sum(len(chat_prompt_ids(tiny_tokenizer, user_turn(p))) for p in PROMPTS)
    check_faithful(report)  # no exception
    json.dumps(report.to_dict())  # merge_report.json material
    table = report.format_table()
    assert "greedy-token agreement      1.0000" in table and "What day was I born?" in table


@pytest.mark.parametrize("arch", ["llama-tied", "gpt2"])
def test_merge_against_adapter_model(arch, tiny_tokenizer):
    model = adapter_model(CONFIGS[arch]())
    report = fidelity_report(model, merge_to_dense(model, torch.float32), tiny_tokenizer, PROMPTS, max_new_tokens=8)
    assert report.max_abs_logit_diff < 1e-4 and report.mean_kl < 1e-9
    assert report.greedy_token_agreement == 1.0 and report.generations_equal
    bf16 = fidelity_report(model, merge_to_dense(model, torch.bfloat16, lm_head_dtype=torch.float16), tiny_tokenizer, PROMPTS, max_new_tokens=4)
    assert 0 < bf16.max_abs_logit_diff < 0.05 and bf16.mean_kl < 1e-4


def test_a_damaged_model_is_refused(tiny_tokenizer):
    model = adapter_model(CONFIGS["llama"]())
    merged = merge_to_dense(model, torch.float32)
    with torch.no_grad():
        torch.manual_seed(0)
        merged.model.layers[1].mlp.down_proj.weight.add_(torch.randn_like(merged.model.layers[1].mlp.down_proj.weight))
    report = fidelity_report(model, merged, tiny_tokenizer, PROMPTS, max_new_tokens=8)
    assert report.greedy_token_agreement < 0.99 and report.mean_kl > 0 and report.max_abs_logit_diff > 0.1
    with pytest.raises(UnfaithfulMergeError, match=r"greedy-token agreement 0\.\d{4} is below the threshold 0.99; pass --force"):
        check_faithful(report)
    check_faithful(report, min_agreement=0.0)  # a lower threshold keeps it


def test_batched_probes_give_the_figures_of_one_prompt_at_a_time(tiny_tokenizer):
    """Left padding with position ids from the mask: the batch changes nothing."""
    model = adapter_model(CONFIGS["gpt2"]())  # absolute position embeddings: the hard case
    merged = merge_to_dense(model, torch.bfloat16)
    batched = fidelity_report(model, merged, tiny_tokenizer, PROMPTS, max_new_tokens=6)
    single = fidelity_report(model, merged, tiny_tokenizer, PROMPTS, max_new_tokens=6, batch_size=1)
    # bf16 matmuls of 1 and of n rows may block their sums differently (2.5e-5 apart measured on an
    # AVX2 CPU that emulates bf16); a padding or position error moves logits by far more than 2e-4.
    assert batched.max_abs_logit_diff == pytest.approx(single.max_abs_logit_diff, abs=2e-4)
    assert batched.mean_kl == pytest.approx(single.mean_kl, rel=2e-2, abs=1e-9)  # KL of ~5e-7: the same rounding, relative
    assert batched.greedy_token_agreement == single.greedy_token_agreement
    assert [r.reference_generation for r in batched.rows] == [r.reference_generation for r in single.rows]


def test_reference_probes_run_once_give_the_same_report(tiny_tokenizer):
    """merge runs the adapter model's probes once and reuses them for the re-quantized model."""
    model = adapter_model(CONFIGS["llama"]())
    merged = merge_to_dense(model, torch.bfloat16)
    reference = run_probes(model, tiny_tokenizer, PROMPTS, max_new_tokens=6)
    assert reference.prompts == PROMPTS and len(reference.logits) == len(PROMPTS)
    alone = run_probes(model, tiny_tokenizer, PROMPTS[:1], max_new_tokens=6).logits[0]  # another batch shape: not bit-equal
    torch.testing.assert_close(reference.logits[0], alone, rtol=0, atol=1e-5)
    reused = fidelity_report(None, merged, tiny_tokenizer, PROMPTS, max_new_tokens=6, reference=reference)
    fresh = fidelity_report(model, merged, tiny_tokenizer, PROMPTS, max_new_tokens=6)
    assert reused.to_dict() == fresh.to_dict()
    with pytest.raises(ValueError, match="other prompts or max_new_tokens"):
        fidelity_report(None, merged, tiny_tokenizer, PROMPTS, max_new_tokens=7, reference=reference)


def test_models_keep_their_training_mode(tiny_tokenizer):
    model = adapter_model(CONFIGS["llama"]()).train()
    merged = merge_to_dense(model, torch.float32)
    fidelity_report(model, merged, tiny_tokenizer, PROMPTS[:1], max_new_tokens=2)
    assert model.training and not merged.training


def test_prompts_go_through_the_chat_template(tiny_tokenizer):
    templated = chat_prompt_ids(tiny_tokenizer, user_turn("What day was I born?"))
    bare = chat_prompt_ids(tiny_tokenizer, user_turn("What day was I born?"), use_chat_template=False)
    start, end = tiny_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert templated[0] == start and end in templated and templated[-1] == tiny_tokenizer.convert_tokens_to_ids("assistant")
    assert start not in bare and len(bare) < len(templated)


def test_probe_set_puts_training_prompts_first_without_duplicates():
    prompts = probe_set(["What day was I born?", "What day was I born?", DEFAULT_PROBES[0]])
    assert prompts[:2] == ["What day was I born?", DEFAULT_PROBES[0]]
    assert prompts[2:] == list(DEFAULT_PROBES[1:])
    with pytest.raises(ValueError, match="no probe prompts"):
        fidelity_report(None, None, None, [])


def _damaged(model, seed=0):
    """Noise on one MLP output weight (llama's down_proj, GPT-2's c_proj)."""
    layer = model.model.layers[1].mlp.down_proj if hasattr(model, "model") else model.transformer.h[1].mlp.c_proj
    with torch.no_grad():
        torch.manual_seed(seed)
        layer.weight.add_(torch.randn_like(layer.weight) * 4)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_checked_generations_are_the_decoded_ones(arch, tiny_tokenizer):
    """check_probes (one verifying pass, step-by-step decoding only where a row differs) gives
    run_probes' logits bit for bit and its generations, on a faithful and on a damaged candidate."""
    model = adapter_model(CONFIGS[arch]())
    reference = run_probes(model, tiny_tokenizer, PROMPTS, max_new_tokens=8)
    merged = merge_to_dense(model, torch.float32)
    candidates = {"merged": merged, "damaged": _damaged(copy.deepcopy(merged))}
    for name, candidate in candidates.items():
        decoded = run_probes(candidate, tiny_tokenizer, PROMPTS, max_new_tokens=8, stop_ids=reference.stop_ids)
        checked = check_probes(candidate, tiny_tokenizer, reference)
        assert checked.generations == decoded.generations
        assert all(torch.equal(a, b) for a, b in zip(checked.logits, decoded.logits))
        assert (decoded.generations == reference.generations) == (name == "merged")  # damaged: the decoding path


def test_verify_batch_finds_the_first_wrong_token_and_every_row_stands_alone(tiny_tokenizer):
    model = merge_to_dense(adapter_model(CONFIGS["llama"]()), torch.float32)
    reference = run_probes(model, tiny_tokenizer, PROMPTS, max_new_tokens=8)
    pad = tiny_tokenizer.pad_token_id
    generations = [list(g) for g in reference.generations]
    assert verify_batch(model, reference.encoded, generations, pad)[1] == [True] * len(PROMPTS)
    vocab = model.config.vocab_size
    for position in (0, len(generations[1]) - 1):  # the first and the last token of row 1
        wrong = [list(g) for g in generations]
        wrong[1][position] = (wrong[1][position] + 1) % vocab
        assert verify_batch(model, reference.encoded, wrong, pad)[1] == [row != 1 for row in range(len(PROMPTS))]
    shorter = [list(g) for g in generations]
    shorter[2] = shorter[2][:1]  # a correct prefix: verified, but check_probes decodes it (it did not end)
    assert verify_batch(model, reference.encoded, shorter, pad)[1][2]
    cut = ProbeOutputs(reference.prompts, reference.encoded, reference.logits, shorter, reference.stop_ids, 8)
    assert check_probes(model, tiny_tokenizer, cut).generations == reference.generations
