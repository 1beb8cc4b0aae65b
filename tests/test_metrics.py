"""Metrics against their references: SQuAD v1.1 EM/F1 rules, ROUGE by hand, GSM8K answer extraction,
McNemar against scipy's binomial test."""

from __future__ import annotations

import pytest

from lmlab.evaluation.metrics import (
    accuracy,
    exact_match,
    extract_number,
    gsm8k_match,
    normalize_answer,
    rouge,
    token_f1,
)


def test_squad_normalization_and_em():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert exact_match("the Eiffel tower.", ["Eiffel Tower"]) == 1.0
    assert exact_match("Paris, France", ["paris"]) == 0.0
    assert exact_match("1945", ["1944", "1945"]) == 1.0


def test_token_f1_matches_the_squad_formula():
    # pred "barack obama jr", gold "barack obama": common 2, P 2/3, R 1 -> F1 0.8
    assert token_f1("Barack Obama Jr", ["Barack Obama"]) == pytest.approx(0.8)
    assert token_f1("no overlap", ["something else"]) == 0.0
    assert token_f1("obama", ["george bush", "barack obama"]) == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert token_f1("the", ["a"]) == 1.0  # both normalize to empty: SQuAD counts that as a match


def test_accuracy():
    assert accuracy(["A", "B", "C"], ["A", "C", "C"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        accuracy(["A"], [])


def test_rouge_against_a_hand_computed_example():
    pred, ref = "the cat sat on the mat", "the cat lay on the mat"
    # unigrams: 5 of 6 shared (the x2, cat, on, mat) -> F 5/6; bigrams: the-cat, on-the, the-mat = 3 of 5
    # LCS: the cat on the mat = 5 -> F 5/6
    scores = rouge([pred], [[ref]])
    assert scores["rouge1"] == pytest.approx(100 * 5 / 6)
    assert scores["rouge2"] == pytest.approx(100 * 3 / 5)
    assert scores["rougeL"] == pytest.approx(100 * 5 / 6)
    best = rouge([pred], [["nothing alike here", ref]])
    assert best["rouge1"] == pytest.approx(100 * 5 / 6)


def test_gsm8k_final_answer_extraction():
    assert extract_number("She has 3 + 4 = 7 apples.\n#### 7") == "7"
    assert extract_number("#### 1,234") == "1234"
    assert extract_number("The total is $18.00 dollars") == "18"
    assert extract_number("First 5, then 12, so the answer is 42.") == "42"
    assert extract_number("#### -3.50") == "-3.5"
    assert extract_number("no number") is None
    assert gsm8k_match("so 72 clips in all.\n#### 72", "Natalia sold 48/2 = 24 ...\n#### 72") == 1.0
    assert gsm8k_match("The answer is 71", "#### 72") == 0.0


def test_mcnemar_exact_against_scipy():
    from scipy.stats import binomtest

    from lmlab.evaluation.metrics import mcnemar

    a = [1] * 30 + [0] * 12 + [1] * 50 + [0] * 100
    b = [0] * 30 + [1] * 12 + [1] * 50 + [0] * 100
    m = mcnemar(a, b)
    assert (m["a_only"], m["b_only"]) == (30, 12)
    assert m["p"] == pytest.approx(binomtest(12, 42, 0.5).pvalue, rel=1e-12)
    assert mcnemar(a, a)["p"] == 1.0 and mcnemar([1, 0], [0, 1])["p"] == 1.0
    with pytest.raises(ValueError, match="3 items for system a, 2"):
        mcnemar([1, 1, 0], [1, 0])
