"""Classification metrics (accuracy, macro-F1, per-class precision/recall/F1, confusion matrix) and the
minllama prediction file format. Plain Python: no sklearn, so the definitions are visible here.

Macro-F1 is the unweighted mean of per-class F1 (sklearn's `average="macro"`); a class with no
predictions and no examples has precision = recall = F1 = 0, as sklearn's `zero_division=0`.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmlab.fileio import atomic_write_text


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


def write_predictions(path: str | Path, preds: Sequence[int], texts: Sequence[str]) -> Path:
    """`PRED ||| text` per line, the minllama `write_predictions_to_file` format."""
    lines = "".join(f"{p} ||| {t}\n" for p, t in zip(preds, texts, strict=True))
    atomic_write_text(Path(path), lines)
    return Path(path)


def read_predictions(path: str | Path) -> list[int]:
    """The predicted labels of a prediction file (tests, re-scoring)."""
    return [int(line.split(" ||| ", 1)[0]) for line in Path(path).read_text().splitlines() if line]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (n-1; 0 for a single value), as the minllama reference table reports."""
    vals = list(values)
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


__all__ = ["confusion_matrix", "classification_metrics", "write_predictions", "read_predictions", "mean_std"]
