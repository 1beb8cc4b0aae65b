"""Best-of-N: how well each way of choosing one of N sampled solutions does (Cobbe et al. 2021, section 4;
the weighted vote of Li et al. 2022, "Making Large Language Models Better Reasoners with Step-Aware Verifier").

For each problem: K sampled solutions (final answer, right or wrong, verifier score) and the greedy one.
Methods, for a subset of N of the K samples:
  majority   the most frequent final answer (ties: the one reached first; no answer never wins)
  verifier   the highest-scoring sample (verifier best-of-N)
  weighted   the answer with the largest sum of verifier probabilities sigmoid(score)
  oracle     right if any of the N is right (pass@N: the bound of every reranker)
An N < K is scored as the mean over subsets of the K samples (all of them when there are at most
`subsets`, else that many random ones), which has far less variance than one draw; the oracle uses the
exact unbiased pass@k estimator. Paired tests (McNemar) compare methods on the same problems at N = K,
where each method's outcome is one bit per problem.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmlab.evaluation.metrics import mcnemar, pass_at_k

METHODS = ("majority", "verifier", "weighted")
LABELS = {"greedy": "greedy pass@1", "majority": "majority vote@N", "verifier": "verifier best-of-N",
          "weighted": "verifier-weighted vote@N", "oracle": "oracle pass@N"}
PAIRS = (("verifier", "majority"), ("verifier", "greedy"), ("weighted", "majority"), ("weighted", "greedy"),
         ("majority", "greedy"))
"""The paired comparisons reported (system a, system b)."""


@dataclass
class ProblemSamples:
    """One test problem: per sample its final answer (None when none was found), whether it is right, and
    its verifier score (a logit); plus whether the greedy solution is right."""

    answers: list[str | None]
    correct: list[bool]
    scores: list[float]
    greedy: bool = False


def choose(method: str, answers: Sequence[str | None], scores: Sequence[float]) -> int | None:
    """Index of the sample `method` picks among these, or None when it picks nothing (no answers)."""
    if method == "verifier":
        return max(range(len(scores)), key=lambda i: scores[i])  # the first of equal scores
    if method not in ("majority", "weighted"):
        raise ValueError(f"unknown best-of-N method {method!r}; expected one of {METHODS}")
    totals: dict[str, float] = {}
    first: dict[str, int] = {}
    for i, (answer, score) in enumerate(zip(answers, scores)):
        if answer is None:
            continue
        totals[answer] = totals.get(answer, 0.0) + (1.0 if method == "majority" else _sigmoid(score))
        first.setdefault(answer, i)
    if not totals:
        return None
    best = max(totals, key=lambda a: (totals[a], -first[a]))
    return first[best]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _subsets(k: int, n: int, limit: int, rng: random.Random) -> list[tuple[int, ...]]:
    """All size-n subsets of range(k) when there are at most `limit`, else `limit` random ones."""
    if math.comb(k, n) <= limit:
        return list(itertools.combinations(range(k), n))
    return [tuple(sorted(rng.sample(range(k), n))) for _ in range(limit)]


def method_accuracy(problem: ProblemSamples, method: str, n: int, subsets: int, rng: random.Random) -> float:
    """Expected correctness of `method` on this problem over size-n subsets of its samples."""
    k = len(problem.correct)
    if method == "oracle":
        return pass_at_k(k, sum(problem.correct), n)
    total = 0.0
    chosen = _subsets(k, n, subsets, rng)
    for subset in chosen:
        pick = choose(method, [problem.answers[i] for i in subset], [problem.scores[i] for i in subset])
        total += problem.correct[subset[pick]] if pick is not None else 0.0
    return total / len(chosen)


def best_of_n(problems: Sequence[ProblemSamples], ns: Sequence[int], subsets: int = 64, seed: int = 0) -> dict[str, Any]:
    """Accuracy of greedy, each method and the oracle for each N, and paired tests at N = K.

    Returns {"n": [...], "accuracy": {method: [acc at each N]}, "paired": {"a vs b": mcnemar}, "problems": count,
    "samples": K, "outcomes": {method: [bit per problem at N = K]}}."""
    if not problems:
        raise ValueError("best_of_n: no problems")
    k = len(problems[0].correct)
    if any(len(p.correct) != k or len(p.answers) != k or len(p.scores) != k for p in problems):
        raise ValueError("best_of_n: every problem needs the same number of samples, answers and scores")
    if any(not 1 <= n <= k for n in ns):
        raise ValueError(f"best_of_n: N values {list(ns)} must lie in 1..{k}")
    accuracy: dict[str, list[float]] = {"greedy": [_mean([p.greedy for p in problems])] * len(ns)}
    for method in (*METHODS, "oracle"):
        accuracy[method] = []
        for n in ns:
            rng = random.Random(f"{seed}-{method}-{n}")
            accuracy[method].append(_mean([method_accuracy(p, method, n, subsets, rng) for p in problems]))
    outcomes = {"greedy": [bool(p.greedy) for p in problems]}
    for method in METHODS:
        picks = [choose(method, p.answers, p.scores) for p in problems]
        outcomes[method] = [pick is not None and p.correct[pick] for p, pick in zip(problems, picks)]
    outcomes["oracle"] = [any(p.correct) for p in problems]
    paired = {f"{a} vs {b}": mcnemar(outcomes[a], outcomes[b]) for a, b in PAIRS}
    return {"n": list(ns), "problems": len(problems), "samples": k, "accuracy": accuracy, "paired": paired,
            "outcomes": outcomes}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def markdown(result: dict[str, Any]) -> str:
    """The accuracy table (rows: methods; columns: N) and the paired tests at N = K."""
    ns, acc, k = result["n"], result["accuracy"], result["samples"]
    lines = ["| method | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|" + "---:|" * len(ns)]
    for method in ("greedy", *METHODS, "oracle"):
        cells = [f"{a:.3f}" if method != "greedy" or j == 0 else "" for j, a in enumerate(acc[method])]
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    lines += ["", (f"Paired on the same {result['problems']} problems at N={k} (McNemar exact test; a only / "
                   "b only = problems only that system gets right):"), "",
              "| a vs b | a right | b right | a only | b only | p |", "|---|---:|---:|---:|---:|---:|"]
    for name, test in result["paired"].items():
        a, b = name.split(" vs ")
        lines.append(f"| {LABELS[a].replace('@N', f'@{k}').replace('-N', f'-{k}')} vs "
                     f"{LABELS[b].replace('@N', f'@{k}').replace('-N', f'-{k}')} | {sum(result['outcomes'][a])} | "
                     f"{sum(result['outcomes'][b])} | {test['a_only']} | {test['b_only']} | {test['p']:.3g} |")
    return "\n".join(lines)
