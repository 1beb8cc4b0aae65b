"""Generation metrics: accuracy, SQuAD exact match and token F1, ROUGE, GSM8K final-answer match.

EM/F1 follow the official SQuAD v1.1 script (Rajpurkar et al. 2016): lower-case, drop punctuation and
the articles a/an/the, collapse whitespace; F1 over bags of tokens (an answer that normalizes to nothing
scores 1 only against an empty reference, the SQuAD v2.0 rule); the best score over all references.
ROUGE-1/2/L (Lin 2004) is Google's `rouge-score` package (the reference implementation behind most
papers' numbers) with the Porter stemmer, F-measure, best over references.
GSM8K: the number after `####` if present, else the last number in the text (commas, `$`, a trailing
`.0` ignored), compared as numbers.
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
from typing import Any

from lmlab.errors import LmlabError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


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
    """GSM8K final answer: after the last `####`, else the last number in the text; canonical form."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    value = found[0] if "####" in text else found[-1]
    value = value.replace(",", "").replace("$", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


def gsm8k_match(prediction: str, reference: str) -> float:
    got, want = extract_number(prediction), extract_number(reference)
    return float(got is not None and got == want)


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
