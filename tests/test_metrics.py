"""Metrics against their references: SQuAD v1.1 EM/F1 rules, ROUGE by hand, GSM8K answer extraction (a table
of real reference lines and tricky model outputs, and every reference answer of the dataset), AUC against
pairwise counting and scipy, pass@k against counting subsets, McNemar against scipy's binomial test."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from lmlab.evaluation.metrics import (
    accuracy,
    canonical_number,
    exact_match,
    extract_number,
    gsm8k_match,
    normalize_answer,
    pass_at_k,
    roc_auc,
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


# real GSM8K reference lines (openai/grade-school-math) and model outputs of the kinds that trip extractors
EXTRACT_TABLE = [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in "
     "April and May.\n#### 72", "72"),  # train line 1
    ("-21/3 = <<-21/3=-7>>-7 degrees Fahrenheit\nThe average temperature was -7 degrees Fahrenheit.\n#### -7", "-7"),
    ("Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10", "10"),  # train line 2
    ("This means that in 30 days he earns $36 * 30 = $<<36*30=1080>>1080.\n#### 1,080", "1080"),  # train line 346
    ("She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer\u2019s market.\n#### 18", "18"),  # test line 1
    ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("#### -3.50", "-3.5"),
    ("####72", "72"),
    ("#### $1,080.", "1080"),  # dollar sign, thousands comma, trailing period
    ("#### 5 apples", "5"),  # a unit after the answer
    ("The total is $18.00 dollars", "18"),
    ("First 5, then 12, so the answer is 42.", "42"),
    ("The answer is: $1,234.50.", "1234.5"),
    ("So the answer is **42**. Next she buys 3 more.", "42"),  # "answer is" beats a later number
    ("The final answer is \\boxed{42}.", "42"),
    ("#### 72\n\nQuestion: John has 5 apples and eats 2.\nAnswer: 3\n#### 3", "72"),  # the first ####, not an invented one
    ("She walks 3-4 miles a day, so 4", "4"),  # a range, not a minus sign
    ("It was -5 degrees.", "-5"),
    ("The temperature fell to \u22123 degrees", "-3"),  # unicode minus
    ("It costs $.50 each", "0.5"),
    ("The answer is 007.", "7"),
    ("1,000,000 grains.", "1000000"),
    ("He saves 12.5% of it", "12.5"),
    ("Pick 5,6,7 in order", "7"),  # a list, not thousands
    ("She had $40 \u2013 $4 = $36 left.", "36"),  # en dash between amounts is subtraction
    ("Step 2: multiply.", "2"),
    ("area of x2 units", None),  # a digit inside a word is no number
    ("####\nI do not know.", None),
    ("I cannot solve this.", None),
    ("", None),
]


@pytest.mark.parametrize("text, want", EXTRACT_TABLE, ids=[repr(t[:30]) for t, _ in EXTRACT_TABLE])
def test_gsm8k_final_answer_extraction(text, want):
    assert extract_number(text) == want


def test_every_gsm8k_reference_answer_extracts_to_its_final_line(shared_data):
    for split in ("train", "test"):
        lines = (shared_data / "gsm8k" / f"{split}.jsonl").read_text().splitlines()
        assert len(lines) == {"train": 7473, "test": 1319}[split]
        for i, line in enumerate(lines):
            answer = json.loads(line)["answer"]
            final = answer.rsplit("####", 1)[1].strip().replace(",", "")
            assert extract_number(answer) == final, (split, i + 1)
            assert gsm8k_match(answer.rsplit("####", 1)[0] + f"The answer is {final}.", answer) == 1.0


def test_canonical_numbers_and_match():
    assert [canonical_number(x) for x in ("$1,080.00", "-.50", "007", "-0", "3.140", "10")] == \
        ["1080", "-0.5", "7", "0", "3.14", "10"]
    assert gsm8k_match("so 72 clips in all.\n#### 72", "Natalia sold 48/2 = 24 ...\n#### 72") == 1.0
    assert gsm8k_match("The answer is 71", "#### 72") == 0.0
    assert gsm8k_match("no idea", "#### 72") == 0.0


def test_roc_auc_against_pairwise_counting_and_scipy():
    from scipy.stats import mannwhitneyu

    rng = random.Random(0)
    labels = [rng.random() < 0.3 for _ in range(200)]
    scores = [round(rng.gauss(1.0 if y else 0.0, 1.0), 1) for y in labels]  # rounded: many ties
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    pairwise = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert roc_auc(scores, labels) == pytest.approx(pairwise)
    assert roc_auc(scores, labels) == pytest.approx(mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg)))
    assert roc_auc([0.1, 0.9], [False, True]) == 1.0 and roc_auc([0.9, 0.1], [False, True]) == 0.0
    assert roc_auc([1.0, 1.0], [False, True]) == 0.5
    assert roc_auc([0.3, 0.4], [True, True]) is None


def test_pass_at_k_equals_counting_subsets():
    for n, c in [(5, 0), (5, 2), (6, 6), (8, 3)]:
        correct = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            exact = sum(any(correct[i] for i in s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(exact)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


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
