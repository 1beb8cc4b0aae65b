"""torchrun with 2 CPU processes (gloo DDP) gives the same losses as 1 process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_trainer import write_tiny_recipe

from helpers import run_recipe


def _losses(run_dir) -> dict[tuple, float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(x["step"], x.get("split", "train")): x["loss"] for x in lines}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process(tmp_path, shared_data, strategy):
    """FSDP also stops at step 6 and resumes from its gathered checkpoint (sharded save and load)."""
    recipe = write_tiny_recipe(tmp_path, shared_data)
    common = ["train.max_steps=12", "train.eval_every=6", "model.dropout=0.0", "checkpoint.every=6",
              "train.grad_accum=2", "train.threads=1", "schedule.decay_steps=12"]
    single = run_recipe(recipe, common + ["train.batch_size=4", f"out_dir={tmp_path / 'single'}"])

    ddp_dir = tmp_path / strategy
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lmlab", "run", recipe, *common, "train.batch_size=2", f"out_dir={ddp_dir}",
           f"distributed.strategy={strategy}"]
    for stop in ([6, 12] if strategy == "fsdp" else [12]):
        proc = subprocess.run(cmd + [f"train.max_steps={stop}"], capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]

    a, b = _losses(single), _losses(ddp_dir)
    assert a.keys() == b.keys() and len(a) == 12 + 2
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-5), key
    summary = json.loads((ddp_dir / "summary.json").read_text())
    assert summary["tokens_seen"] == 12 * 2 * 4 * 32  # both processes counted
    assert (ddp_dir / "checkpoints" / "step_0000012").is_dir()
