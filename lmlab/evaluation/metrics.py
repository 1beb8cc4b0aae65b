"""Generation metrics: accuracy, SQuAD exact match and token F1, ROUGE, GSM8K final-answer match.

EM/F1 follow the official SQuAD v1.1 script (Rajpurkar et al. 2016): lower-case, drop punctuation and
the articles a/an/the, collapse whitespace; F1 over bags of tokens (an answer that normalizes to nothing
scores 1 only against an empty reference, the SQuAD v2.0 rule); the best score over all references.
ROUGE-1/2/L (Lin 2004) is Google's `rouge-score` package (the reference implementation behind most
papers' numbers) with the Porter stemmer, F-measure, best over references.
GSM8K (`extract_number`): the answer extractor matters as much as the model (verl issue 2150: a brittle
one scores right answers wrong and rewards format over math), so it reads, in this order, the first
`#### N` (the dataset's format; the first, because a model that rambles on invents further problems with
their own `####`), the last `\boxed{N}`, the last "answer is N" / "answer: N", else the last number in
the text; numbers may carry `$`, thousands commas, a sign (a hyphen between two numbers is a range, not a
minus), decimals and trailing units or periods, and compare in canonical form (`$1,080.00` = `1080`).
Classifier scores are ranked by ROC AUC (Mann-Whitney U, ties counted half).
Two systems scored on the same items are compared with McNemar's exact test (the items only one of
them gets right decide it), which is far more sensitive than two separate confidence intervals.
"""

from __future__ import annotations

import math
import re
import statistics
import string
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from lmlab.errors import LmlabError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"(?:(?<![\w.])-)?\$?(?<![\w.])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)?(?:\.\d+)?(?<=\d)")
"""A number: an optional sign (only where a word or a digit does not come before it: `3-4` is a range), `$`,
thousands commas (only real groups of three: `5,6,7` is a list), decimals, `.5` too; not inside a word."""
_FINAL = re.compile(r"####")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER_IS = re.compile(r"answer\s*(?:is|=|:)\s*:?[^\d\n$.-]{0,24}", re.IGNORECASE)
_MINUS = str.maketrans({"\u2212": "-", "\u2013": "-", "\u00a0": " "})


def accuracy(predictions: Sequence[object], references: Sequence[object]) -> float:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return sum(p == r for p, r in zip(predictions, references)) / max(len(references), 1)


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict[str, float]:
    """Paired comparison of two systems on the same items: `a_only` / `b_only` count the items only that
    system gets right; `p` is the exact two-sided McNemar p-value (binomial on those discordant items)."""
    if len(correct_a) != len(correct_b):
        raise ValueError(f"{len(correct_a)} items for system a, {len(correct_b)} for system b")
    a_only = sum(bool(a) and not b for a, b in zip(correct_a, correct_b))
    b_only = sum(bool(b) and not a for a, b in zip(correct_a, correct_b))
    n, k = a_only + b_only, min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n if n else 1.0
    return {"a_only": a_only, "b_only": b_only, "p": min(1.0, 2 * tail)}


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lower, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """Best bag-of-tokens F1 against any reference."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for ref in references:
        gold = normalize_answer(ref).split()
        common = sum((Counter(pred) & Counter(gold)).values())
        if not pred or not gold:
            best = max(best, float(pred == gold))
        elif common:
            p, r = common / len(pred), common / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (x100), each prediction against its best reference."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise LmlabError("ROUGE needs the rouge-score package: pip install 'lmlab[eval]'") from None

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = Counter()
    for pred, refs in zip(predictions, references, strict=True):
        scores = [scorer.score(ref, pred) for ref in refs]
        for key in ("rouge1", "rouge2", "rougeL"):
            totals[key] += max(s[key].fmeasure for s in scores)
    return {k: 100 * totals[k] / max(len(predictions), 1) for k in ("rouge1", "rouge2", "rougeL")}


def extract_number(text: str) -> str | None:
    """GSM8K final answer of a solution or a model output, in canonical form (see the module docstring):
    the first `#### N`, else the last `\\boxed{N}`, else the last "answer is N", else the last number."""
    text = text.translate(_MINUS)
    for mark in _FINAL.finditer(text):
        found = _NUMBER.search(text, mark.end())
        if found and not text[mark.end():found.start()].count("\n") > 1:
            return canonical_number(found.group())
    for pattern, group in ((_BOXED, 1), (_ANSWER_IS, 0)):
        for match in reversed(list(pattern.finditer(text))):
            found = _NUMBER.search(match.group(1)) if group else _NUMBER.match(text, match.end())
            if found:
                return canonical_number(found.group())
    found = _NUMBER.findall(text)
    return canonical_number(found[-1]) if found else None


def canonical_number(token: str) -> str:
    """`$1,080.00` -> `1080`, `-.50` -> `-0.5`, `007` -> `7`, `-0` -> `0`: one spelling per value."""
    value = Decimal(token.replace(",", "").replace("$", "")).normalize()
    text = format(value, "f")
    return "0" if text in ("-0", "0") else text


def gsm8k_match(prediction: str, reference: str) -> float:
    """1.0 when the prediction's final answer equals the reference's (both extracted), else 0.0."""
    got, want = extract_number(prediction), extract_number(reference)
    return float(got is not None and got == want)


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve: the chance that a random positive outscores a random negative (ties half),
    by the rank-sum (Mann-Whitney U) formula with average ranks; None when one class is absent."""
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores for {len(labels)} labels")
    n_pos = sum(bool(y) for y in labels)
    n_neg = len(labels) - n_pos
    if not n_pos or not n_neg:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):  # tied scores share their average rank
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, labels) if y)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chance that at least one of k samples drawn without replacement from n, c of them right, is right
    (the unbiased pass@k estimator of Chen et al. 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k(n={n}, c={c}, k={k}): expected 0 <= c <= n and 1 <= k <= n")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n: int) -> list[list[int]]:
    """Rows = true label, columns = predicted label."""
    m = [[0] * n for _ in range(n)]
    for t, p in zip(y_true, y_pred, strict=True):
        m[t][p] += 1
    return m



def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], label_names: Sequence[str]) -> dict[str, Any]:
    """accuracy, macro_f1, per_class {name: precision, recall, f1, support}, confusion (rows = true)."""
    n = len(label_names)
    cm = confusion_matrix(y_true, y_pred, n)
    per_class: dict[str, dict[str, float]] = {}
    for c, name in enumerate(label_names):
        tp = cm[c][c]
        predicted = sum(cm[r][c] for r in range(n))
        support = sum(cm[c])
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    total = len(y_true)
    return {
        "n": total,
        "accuracy": sum(cm[c][c] for c in range(n)) / total if total else 0.0,
        "macro_f1": statistics.fmean(v["f1"] for v in per_class.values()) if per_class else 0.0,
        "per_class": per_class,
        "confusion": cm,
        "labels": list(label_names),
    }



def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (n-1; 0 for a single value), as the minllama reference table reports."""
    vals = list(values)
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def proportion_interval(successes: float, n: int, z: float = 1.96) -> dict[str, float]:
    """A share with its Wilson score interval (Wilson 1927; 95% at z = 1.96): unlike mean +/- 1.96 SE it
    stays inside [0, 1] and keeps its coverage near 0 and 1 and at a few hundred items."""
    if n <= 0:
        return {"value": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"value": p, "low": centre - half, "high": centre + half, "n": n}


def mean_interval(values: Sequence[float], z: float = 1.96) -> dict[str, float]:
    """A mean with its normal-approximation interval, mean +/- z * s / sqrt(n) (e.g. a win rate whose ties
    count 1/2, where no binomial interval applies)."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return {"value": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    mean = statistics.fmean(vals)
    half = z * (statistics.stdev(vals) if n > 1 else 0.0) / math.sqrt(n)
    return {"value": mean, "low": mean - half, "high": mean + half, "n": n}
