"""Curve plots that read only data: metrics.jsonl lines, result rows, lists of numbers.

Plots never touch a model or a trainer: a run (or sweep) writes its data first and the pictures are
drawn from it afterwards, so a plot can always be redrawn from the folder alone (STYLE.md point 12,
nanochat `runs/scaling_laws.sh`). Figures are built with matplotlib's object API on the Agg canvas
(no pyplot global state, safe in threads and headless), then written atomically.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lmlab.errors import DataError
from lmlab.fileio import atomic_write_bytes, read_text

Metrics = list[dict[str, Any]]

# x-axis name -> the metrics.jsonl key it reads
X_KEYS = {"step": "step", "tokens": "tokens_seen"}
Y_LABELS = {"loss": "loss (nats/token)", "ppl": "perplexity"}


def read_metrics(path: str | Path) -> Metrics:
    """The lines of a metrics.jsonl file; a torn last line (a run killed mid-write) is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: no metrics file (expected a run folder with metrics.jsonl)")
    lines = read_text(path, "metrics file").splitlines()
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if lineno == len(lines):
                break
            raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
    return rows


def series(metrics: Metrics, y: str, split: str = "train", x: str = "step") -> tuple[list[float], list[float]]:
    """(xs, ys) of metric `y` for one split; lines without the keys are skipped."""
    xkey = X_KEYS[x]
    xs, ys = [], []
    for row in metrics:
        if row.get("split", "train") != split or row.get(xkey) is None:
            continue
        value = row.get(y)
        if value is None and y == "ppl" and row.get("loss") is not None:
            value = math.exp(min(row["loss"], 50.0))  # old lines without ppl
        if value is not None and math.isfinite(value):
            xs.append(row[xkey])
            ys.append(value)
    return xs, ys


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Render `fig` to PNG bytes in memory, then write them atomically."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def _axes(title: str, xlabel: str, ylabel: str, logy: bool = False, size=(7.0, 4.2)):
    fig = Figure(figsize=size)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    return fig, ax


def plot_run_curve(metrics: Metrics, y: str, path: str | Path, title: str = "", x: str = "step") -> Path:
    """Train and validation curves of one metric ("loss" or "ppl") of one run."""
    fig, ax = _axes(title or Y_LABELS[y], x, Y_LABELS[y], logy=(y == "ppl"))
    xs, ys = series(metrics, y, "train", x)
    if xs:
        ax.plot(xs, ys, label="train", linewidth=1.2)
    vx, vy = series(metrics, y, "val", x)
    if vx:
        ax.plot(vx, vy, "o-", label="val", linewidth=1.5, markersize=4)
    if not xs and not vx:
        raise DataError(f"no {y} values to plot for {title or path}")
    ax.legend()
    return save_figure(fig, path)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None, name: str = "") -> list[Path]:
    """loss.png and perplexity.png (vs step) of a run folder, in `out_dir` (default run_dir/plots)."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "plots"
    metrics = read_metrics(run_dir)
    name = name or run_dir.name
    suffix = f"_{name}" if out_dir else ""
    return [
        plot_run_curve(metrics, "loss", out / f"loss{suffix}.png", f"loss: {name}"),
        plot_run_curve(metrics, "ppl", out / f"perplexity{suffix}.png", f"perplexity: {name}"),
    ]


def plot_overlay(
    runs: Mapping[str, Metrics], y: str, path: str | Path, x: str = "step", title: str = ""
) -> Path:
    """Several runs on one axis: train as a line, validation as dashed markers of the same colour."""
    fig, ax = _axes(title or f"{Y_LABELS[y]} by {x}", x, Y_LABELS[y], logy=(y == "ppl"))
    drawn = 0
    for i, (label, metrics) in enumerate(runs.items()):
        color = f"C{i % 10}"
        xs, ys = series(metrics, y, "train", x)
        if xs:
            ax.plot(xs, ys, color=color, linewidth=1.0, alpha=0.8, label=f"{label} train")
        vx, vy = series(metrics, y, "val", x)
        if vx:
            ax.plot(vx, vy, "o--", color=color, linewidth=1.2, markersize=3, label=f"{label} val")
        drawn += bool(xs or vx)
    if not drawn:
        raise DataError(f"no {y} values to plot in {path}")
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def plot_lines(
    lines: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logy: bool = False,
    vlines: Mapping[str, float] | None = None,
    markers: bool = False,
) -> Path:
    """Generic labelled (xs, ys) lines, with optional labelled vertical reference lines."""
    fig, ax = _axes(title, xlabel, ylabel, logy)
    for label, (xs, ys) in lines.items():
        ax.plot(list(xs), list(ys), "o-" if markers else "-", label=label, linewidth=1.2, markersize=3)
    for i, (label, xv) in enumerate((vlines or {}).items()):
        ax.axvline(xv, color="gray", linestyle=":" if i else "--", linewidth=1.0, label=label)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_loss_by_position(
    curves: Mapping[str, Sequence[float]],
    path: str | Path,
    trained_context: int | None = None,
    smooth: int = 1,
    title: str = "loss by position",
) -> Path:
    """Mean NLL at each position of long windows, one line per model (attention-sink experiment).

    `smooth` > 1 averages over a moving window of that many positions: per-position means of a few
    windows are noisy, and the claim is about the trend past the trained context.
    """
    lines = {label: (range(1, len(_smooth(ys, smooth)) + 1), _smooth(ys, smooth)) for label, ys in curves.items()}
    vlines = {f"trained context ({trained_context})": trained_context} if trained_context else None
    return plot_lines(lines, path, title=title, xlabel="position in window", ylabel="mean NLL (nats)",
                      vlines=vlines)


def _smooth(ys: Sequence[float], k: int) -> list[float]:
    """Trailing moving average of width k (the first k-1 points average what exists so far)."""
    out, total = [], 0.0
    for i, y in enumerate(ys):
        total += y
        if i >= k:
            total -= ys[i - k]
        out.append(total / min(i + 1, k))
    return out


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]], labels: Sequence[str], path: str | Path,
    title: str = "confusion matrix", normalize: bool = False,
) -> Path:
    """Rows = true label, columns = predicted label; counts (or row shares) written in each cell."""
    n = len(labels)
    if len(matrix) != n or any(len(row) != n for row in matrix):
        raise DataError(f"confusion matrix must be {n}x{n} for labels {list(labels)}")
    values = [[float(v) for v in row] for row in matrix]
    if normalize:
        values = [[v / (sum(row) or 1.0) for v in row] for row in values]
    fig, ax = _axes(title, "predicted", "true", size=(1.2 + 0.7 * n, 1.0 + 0.6 * n))
    ax.grid(False)
    im = ax.imshow(values, cmap="Blues")
    fig.colorbar(im, ax=ax)
    ax.set_xticks(range(n), list(labels), rotation=45, ha="right")
    ax.set_yticks(range(n), list(labels))
    peak = max((v for row in values for v in row), default=0.0) or 1.0
    for i in range(n):
        for j in range(n):
            text = f"{values[i][j]:.2f}" if normalize else f"{int(values[i][j])}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if values[i][j] > 0.6 * peak else "black")
    return save_figure(fig, path)
