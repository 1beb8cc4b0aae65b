"""Plots are drawn from real metrics.jsonl files and written as non-empty PNGs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lmlab.errors import DataError
from lmlab.evaluation import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_recipe(folder: Path, data: Path, **extra: str) -> Path:
    """A 1-layer character model on Tiny Shakespeare that trains in about a second."""
    text = f"""
out_dir: {folder / 'run'}
model: {{spec: preset:llama2c-stories260k, dim: 32, n_layers: 1, n_heads: 2, n_kv_heads: 2, hidden_dim: 64,
        max_seq_len: 32}}
data: {{path: {data / 'tinyshakespeare' / 'input.txt'}, tokenizer: char, seq_len: 32, val_batches: 2,
       cache_dir: {folder / 'cache'}}}
train: {{max_steps: 6, batch_size: 4, eval_every: 3}}
schedule: {{warmup_steps: 1}}
checkpoint: {{every: 3}}
logging: {{log_every: 1, progress: false, peak_tflops: 0.1}}
precision: {{device: cpu}}
"""
    path = folder / "tiny.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmlab.paths import data_dir
    from helpers import run_recipe

    folder = tmp_path_factory.mktemp("plots")
    return run_recipe(tiny_recipe(folder, data_dir()))


def assert_png(path: Path) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000, path


def test_read_metrics_has_train_and_val_lines(run_dir: Path) -> None:
    rows = plots.read_metrics(run_dir)
    xs, ys = plots.series(rows, "loss", "train")
    vx, vy = plots.series(rows, "loss", "val")
    assert xs == [1, 2, 3, 4, 5, 6] and vx == [3, 6]
    assert all(y > 0 for y in ys + vy)
    _, ppl = plots.series(rows, "ppl", "val")
    assert ppl == pytest.approx([math.exp(v) for v in vy], rel=1e-9)


def test_run_plots_are_pngs(run_dir: Path, tmp_path: Path) -> None:
    paths = plots.plot_run(run_dir, tmp_path, name="tiny")
    assert [p.name for p in paths] == ["loss_tiny.png", "perplexity_tiny.png"]
    for p in paths:
        assert_png(p)
    by_tokens = plots.plot_run_curve(plots.read_metrics(run_dir), "loss", tmp_path / "tok.png", x="tokens")
    assert_png(by_tokens)


def test_overlay_and_helpers(run_dir: Path, tmp_path: Path) -> None:
    rows = plots.read_metrics(run_dir)
    assert_png(plots.plot_overlay({"a": rows, "b": rows[:3]}, "ppl", tmp_path / "overlay.png"))
    assert_png(plots.plot_loss_by_position({"m": [3.0, 2.5, 2.4, 2.6, 3.1]}, tmp_path / "pos.png", 3, smooth=2))
    assert_png(plots.plot_confusion_matrix([[5, 1], [2, 7]], ["neg", "pos"], tmp_path / "cm.png", normalize=True))
    assert list(tmp_path.glob(".*.tmp")) == []  # atomic writes leave no temp files behind


def test_torn_last_line_is_skipped_and_bad_inputs_raise(tmp_path: Path) -> None:
    good = json.dumps({"step": 1, "split": "train", "loss": 2.0})
    (tmp_path / "metrics.jsonl").write_text(good + "\n" + '{"step": 2, "lo')
    assert plots.read_metrics(tmp_path) == [json.loads(good)]
    (tmp_path / "metrics.jsonl").write_text('{"bad\n' + good + "\n")
    with pytest.raises(DataError, match="metrics.jsonl:1"):
        plots.read_metrics(tmp_path)
    with pytest.raises(DataError, match="no loss values"):
        plots.plot_run_curve([], "loss", tmp_path / "x.png")
    with pytest.raises(DataError, match="2x2"):
        plots.plot_confusion_matrix([[1, 2, 3]], ["a", "b"], tmp_path / "cm.png")
