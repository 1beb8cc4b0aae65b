"""A run killed with SIGKILL and resumed gives the same loss curve as one never interrupted."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pytest
from test_trainer import write_tiny_recipe

from helpers import run_recipe

KILLER = textwrap.dedent("""
    import os, signal, sys
    import lmlab.tasks.pretrain as run
    calls = 0
    real_loss = run.lm_loss

    def loss_then_die(model, batch):  # SIGKILL in the middle of a step, after the step-20 checkpoint
        global calls
        calls += 1
        if calls == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_loss(model, batch)

    run.lm_loss = loss_then_die
    from lmlab.schema.load import load_config
    from lmlab.schema.pretrain import PretrainConfig
    run.run_pretrain(load_config(sys.argv[1], sys.argv[3:], schema=PretrainConfig))
""")


def _curve(path) -> dict[tuple, tuple]:
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    return {(x["step"], x.get("split", "train")): (x["loss"], x.get("lr"), x.get("grad_norm")) for x in lines}


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, shared_data):
    recipe = write_tiny_recipe(tmp_path, shared_data)  # dropout 0.1: the RNG state must be restored too
    common = ["train.max_steps=40", "checkpoint.every=10"]
    full = run_recipe(recipe, common + [f"out_dir={tmp_path / 'full'}"])

    killed_dir = tmp_path / "killed"
    args = [sys.executable, "-c", KILLER, recipe, "33", *common, f"out_dir={killed_dir}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    before = _curve(killed_dir / "metrics.jsonl")
    assert max(step for step, _ in before) in range(20, 30)  # died between checkpoints 20 and 30
    assert (killed_dir / "checkpoints" / "step_0000020").is_dir()
    assert not (killed_dir / "checkpoints" / "step_0000030").exists()

    run_recipe(recipe, common + [f"out_dir={killed_dir}"])
    a, b = _curve(full / "metrics.jsonl"), _curve(killed_dir / "metrics.jsonl")
    assert a.keys() == b.keys() and len(a) == 40 + 4
    for key in a:
        for x, y in zip(a[key], b[key]):
            assert x == pytest.approx(y, abs=1e-6), key
    sa = json.loads((full / "summary.json").read_text())
    sb = json.loads((killed_dir / "summary.json").read_text())
    assert sa["val_loss"] == pytest.approx(sb["val_loss"], abs=1e-6) and sa["tokens_seen"] == sb["tokens_seen"]
