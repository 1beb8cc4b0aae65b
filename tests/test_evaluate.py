"""Sliding-window perplexity against direct computations, loss by position, checkpoint evaluation."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmlab.errors import ConfigError
from lmlab.evaluation import evaluate
from lmlab.model.config import ModelConfig
from lmlab.model.transformer import Transformer
from tests.test_plots import tiny_recipe


def tiny_model(**kw) -> Transformer:
    cfg = ModelConfig(**{**dict(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16), **kw})
    return Transformer(cfg).eval()


def test_one_window_equals_the_full_sequence_loss() -> None:
    model, ids = tiny_model(), torch.randint(0, 50, (16,))
    result = evaluate.sliding_window_perplexity(model, ids, context=16, stride=16)
    direct = F.cross_entropy(model(ids[None, :-1])[0], ids[1:])
    assert result.n_tokens == 15 and result.n_windows == 1
    assert result.nll == pytest.approx(direct.item(), abs=1e-6)
    assert result.ppl == pytest.approx(math.exp(direct.item()), rel=1e-6)


def test_strided_windows_match_the_hf_method_by_hand() -> None:
    assert evaluate.window_plan(22, 8, 4) == [(0, 8, 1), (4, 12, 8), (8, 16, 12), (12, 20, 16), (16, 22, 20)]
    model, ids = tiny_model(), torch.randint(0, 50, (22,))
    # by hand: token t is scored once, by the window that first reaches it, seeing ids[begin:t]
    nlls = []
    with torch.no_grad():
        for begin, end, first in evaluate.window_plan(22, 8, 4):
            for t in range(first, end):
                logp = torch.log_softmax(model(ids[None, begin:t])[0, -1], -1)
                nlls.append(-logp[ids[t]].item())
    expected = sum(nlls) / len(nlls)
    assert len(nlls) == 21  # every token but the first, exactly once
    for batch_size in (1, 3):
        got = evaluate.sliding_window_perplexity(model, ids, context=8, stride=4, batch_size=batch_size)
        assert got.nll == pytest.approx(expected, abs=1e-5) and got.n_tokens == 21


def test_bad_settings_name_the_option() -> None:
    with pytest.raises(ConfigError, match="stride"):
        evaluate.window_plan(10, 4, 5)
    with pytest.raises(ConfigError, match="context"):
        evaluate.window_plan(10, 1, 1)


def test_loss_by_position_modes() -> None:
    windows = torch.randint(0, 50, (3, 41))  # 40 positions: 2.5x the trained context of 16
    dense_model = tiny_model()
    dense = evaluate.loss_by_position(dense_model, windows, "dense", batch_size=2)
    logits = dense_model(windows[:, :-1])
    by_hand = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none").mean(0)
    assert dense.shape == (40,) and torch.allclose(dense, by_hand, atol=1e-5)
    # the KV cache gives the same losses as one forward when nothing is evicted
    assert torch.allclose(evaluate.loss_by_position(dense_model, windows, "streaming"), dense, atol=1e-4)
    sinks = tiny_model(sink_tokens=2)
    inside = windows[:, :17]
    assert torch.allclose(evaluate.loss_by_position(sinks, inside, "streaming"),
                          evaluate.loss_by_position(sinks, inside, "dense"), atol=1e-4)
    streamed = evaluate.loss_by_position(sinks, windows, "streaming")
    assert torch.isfinite(streamed).all()
    assert torch.allclose(streamed[:16], evaluate.loss_by_position(sinks, windows, "dense")[:16], atol=1e-4)
    windowed = evaluate.loss_by_position(dense_model, windows, "window")
    assert torch.allclose(windowed[:16], dense[:16], atol=1e-5) and not torch.allclose(windowed, dense)
    assert dense_model.config.window is None  # the temporary window is undone
    ppl = evaluate.split_ppl(dense, 16)
    assert ppl["ppl_inside"] == pytest.approx(math.exp(dense[:16].mean().item()), rel=1e-5)


def test_evaluate_run_writes_a_row_per_checkpoint(tmp_path: Path, shared_data: Path) -> None:
    from helpers import run_recipe

    run = run_recipe(tiny_recipe(tmp_path, shared_data), ["train.max_steps=4", "train.eval_every=2",
                                                         "checkpoint.every=2"])
    csv_path, png = evaluate.evaluate_run(run)
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["checkpoint"] for r in rows] == ["step_0000002", "step_0000004", "best"]
    assert [r["step"] for r in rows[:2]] == ["2", "4"]
    best = min(rows[:2], key=lambda r: float(r["val_loss"]))  # best/ is the lowest validation loss
    assert (rows[2]["step"], rows[2]["val_loss"]) == (best["step"], best["val_loss"])
    summary = json.loads((run / "summary.json").read_text())
    assert float(rows[1]["val_loss"]) == pytest.approx(summary["val_loss"], rel=1e-5)  # same split, same loss
    assert float(rows[1]["val_ppl"]) == pytest.approx(math.exp(float(rows[1]["val_loss"])))
    assert png.stat().st_size > 2000


def test_long_context_eval_of_two_runs(tmp_path: Path, shared_data: Path) -> None:
    from helpers import run_recipe

    recipe = tiny_recipe(tmp_path, shared_data)
    runs = [run_recipe(recipe, ["train.max_steps=2", f"out_dir={tmp_path / name}", *extra])
            for name, extra in (("plain", []), ("sinks", ["model.sink_tokens=2"]))]
    paths = evaluate.long_context_eval(runs, tmp_path / "eval", factor=2, n_windows=2, gen_seed=0)
    with open(tmp_path / "eval" / "long_context.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["mode"]) for r in rows] == [("plain", "dense"), ("plain", "window"),
                                                     ("sinks", "streaming"), ("sinks", "dense")]
    assert all(r["window_len"] == "64" and r["context"] == "32" for r in rows)
    samples = (tmp_path / "eval" / "long_context_samples.txt").read_text()
    assert samples.count("trained context ends here") == 2
    assert all(p.stat().st_size > 0 for p in paths)


def test_perplexity_command_on_a_checkpoint_and_a_jsonl_field(tmp_path: Path, capsys) -> None:
    from lmlab.cli import main
    from lmlab.tokenization.char import CharTokenizer
    from lmlab.weights.checkpoint import save_checkpoint

    text = "the cat sat on the mat. " * 6
    tok = CharTokenizer.from_text(text)
    model = tiny_model(vocab_size=tok.vocab_size)
    save_checkpoint(model, tmp_path / "ckpt", tokenizer=tok)
    (tmp_path / "data.jsonl").write_text(json.dumps({"body": text}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["perplexity", str(tmp_path / "ckpt"), "--data", str(tmp_path / "data.jsonl"), "--field", "body",
              "--context", "12", "--stride", "5", "--json"])
    assert exit_info.value.code == 0
    out = json.loads(capsys.readouterr().out)
    expected = evaluate.sliding_window_perplexity(model, tok.encode(text), context=12, stride=5)
    assert out["ppl"] == pytest.approx(expected.ppl, rel=1e-5) and out["n_tokens"] == len(text) - 1
