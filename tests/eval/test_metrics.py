"""Metrics against hand-computed values; perplexity against a manual NLL on a tiny model."""

import math

import pytest
import torch

from qlorakit.eval.metrics import (
    contains_answer, exact_match, normalize_answer, parse_metrics, perplexity, token_f1, token_nll,
)


@pytest.mark.parametrize("text, expected", [
    ("The Cat!", "cat"),
    ("  an   apple, a pear ", "apple pear"),
    ("Theatre", "theatre"),  # articles only as whole words
    ("January 1, 2058.", "january 1 2058"),
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    assert exact_match("The answer is Paris.", "Paris") == 0.0
    assert exact_match("  paris!! ", "Paris") == 1.0
    assert exact_match("the Eiffel tower", "Eiffel Tower.") == 1.0


def test_contains_answer_whole_tokens():
    assert contains_answer("I think it is Paris, France.", "paris") == 1.0
    assert contains_answer("Parisian food", "Paris") == 0.0
    assert contains_answer("It was on January 1, 2058!", "January 1, 2058") == 1.0


def test_token_f1_hand_computed():
    # pred tokens: [blue, sky, today]; gold: [blue, sky] -> P = 2/3, R = 1, F1 = 0.8
    assert token_f1("The blue sky today", "blue sky") == pytest.approx(0.8)
    # repeated tokens count as a multiset: pred [x x x] ∩ gold [x] = 1 -> P = 1/3, R = 1, F1 = 0.5
    assert token_f1("x x x", "x") == pytest.approx(0.5)
    assert token_f1("red", "blue") == 0.0
    assert token_f1("the", "a") == 1.0  # both normalise to nothing
    assert token_f1("the", "cat") == 0.0


def test_parse_metrics():
    assert parse_metrics("ppl, f1,ppl") == ["ppl", "f1"]
    with pytest.raises(ValueError, match="unknown metric bleu"):
        parse_metrics("ppl,bleu")


def test_perplexity_is_exp_mean_token_nll(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 300, 42, 9, 1000]])
    labels = ids.clone()
    labels[0, :3] = -100  # score tokens 3, 4, 5 (predicted from positions 2, 3, 4)
    with torch.no_grad():
        logits = model(ids).logits
    total, n = token_nll(logits, labels)
    log_probs = torch.log_softmax(logits[0].double(), dim=-1)
    manual = [-float(log_probs[t - 1, ids[0, t]]) for t in (3, 4, 5)]
    assert n == 3
    assert total == pytest.approx(sum(manual), rel=1e-5)
    assert perplexity(total, n) == pytest.approx(math.exp(sum(manual) / 3), rel=1e-5)
    # HF's own mean loss over the same labels agrees
    with torch.no_grad():
        assert perplexity(total, n) == pytest.approx(math.exp(float(model(ids, labels=labels).loss)), rel=1e-5)
    assert math.isnan(perplexity(0.0, 0))


def test_nll_at_scored_positions_equals_the_full_token_nll():
    """Logits computed only where some row's next token is scored give the same sums as all logits."""
    import torch

    from qlorakit.eval.metrics import IGNORE_INDEX, nll_at, scored_positions, token_nll

    torch.manual_seed(0)
    logits = torch.randn(3, 9, 50)
    labels = torch.randint(0, 50, (3, 9))
    labels[0, :5] = IGNORE_INDEX
    labels[1, :3] = IGNORE_INDEX
    labels[1, 7:] = IGNORE_INDEX
    labels[2, :] = IGNORE_INDEX
    labels[2, 6] = 4
    positions = scored_positions(labels)
    assert positions.tolist() == [2, 3, 4, 5, 6, 7]  # position t predicts labels[t + 1]
    whole, n = token_nll(logits, labels)
    part, m = nll_at(logits[:, positions], labels, positions)
    assert m == n == 4 + 4 + 1 and abs(part - whole) < 1e-4
