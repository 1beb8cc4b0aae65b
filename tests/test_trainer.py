"""The training loop: loss falls, token-weighted accumulation, NaN stop, run folder contents."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmlab.data.batch import IGNORE_INDEX
from lmlab.model.config import ModelConfig
from lmlab.model.transformer import Transformer
from lmlab.precision import Precision, resolve_device
from helpers import run_recipe
from lmlab.train.logger import MetricsLogger
from lmlab.train.loop import FitConfig, TrainingDiverged, fit
from lmlab.train.losses import lm_loss
from lmlab.train.optim import build_optimizer
from lmlab.train.schedule import Schedule
from lmlab.train.state import Checkpointer

CPU = Precision(resolve_device("cpu"), "fp32")


def tiny_model(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = dict(vocab_size=16, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=16)
    return Transformer(ModelConfig(**{**cfg, **kw}))


def pattern_batches(step: int, micro: int = 0, batch: int = 4, T: int = 12):
    """A learnable stream: token t+1 = (token t + 3) mod 16."""
    g = torch.Generator().manual_seed(step * 100 + micro)
    start = torch.randint(0, 16, (batch, 1), generator=g)
    seq = (start + 3 * torch.arange(T + 1)) % 16
    return {"input_ids": seq[:, :-1], "labels": seq[:, 1:]}


def test_loss_falls_on_a_tiny_model():
    model = tiny_model()
    opt = build_optimizer(model, lr=3e-3, weight_decay=0.0)
    val = [pattern_batches(10_000 + i) for i in range(2)]
    cfg = FitConfig(max_steps=60, log_every=10, progress_bar=False)
    res = fit(model, lm_loss, pattern_batches, opt, Schedule(3e-3, 5, 60), cfg, CPU, val_data=val)
    assert res.val_loss < 0.3 * math.log(16), res.val_loss
    assert res.progress.step == 60 and res.progress.tokens_seen == 60 * 4 * 12


def _padded(step: int, micro: int = 0):
    """Micro-batches with very different numbers of unmasked tokens."""
    b = pattern_batches(step, micro, batch=2)
    b["labels"] = b["labels"].clone()
    b["labels"][:, (2 if micro == 0 else 10):] = IGNORE_INDEX
    return b


def test_accumulation_equals_one_big_batch_token_weighted():
    def run(grad_accum: int, data):
        model = tiny_model()
        opt = build_optimizer(model, impl="torch", lr=1e-2, weight_decay=0.1)
        cfg = FitConfig(max_steps=3, grad_accum=grad_accum, grad_clip=0.5, log_every=1, progress_bar=False)
        res = fit(model, lm_loss, data, opt, Schedule(1e-2, 0, 3, kind="constant"), cfg, CPU)
        return model, res

    def big(step, micro=0):
        parts = [_padded(step, m) for m in range(2)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    m1, r1 = run(2, _padded)
    m2, r2 = run(1, big)
    assert r1.train_loss == pytest.approx(r2.train_loss, abs=1e-6)
    # 1e-5: float summation order differs between one batch and two (chunked loss kernel); a
    # per-micro-batch mean instead of token weighting is off by ~1e-3 here
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path):
    model = tiny_model()
    opt = build_optimizer(model, lr=1e-3)

    def loss_fn(model, batch):
        out = lm_loss(model, batch)
        out.loss = out.loss * float("nan") if batch["step"] == 7 else out.loss
        return out

    data = lambda step, micro=0: {**pattern_batches(step), "step": torch.tensor(step)}  # noqa: E731
    ckpt = Checkpointer(tmp_path / "checkpoints")
    cfg = FitConfig(max_steps=20, checkpoint_every=5, log_every=1, progress_bar=False)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 8.*step_0000005"):
        fit(model, lm_loss if False else loss_fn, data, opt, Schedule(1e-3, 0, 20), cfg, CPU,
            checkpointer=ckpt, logger=MetricsLogger(tmp_path / "metrics.jsonl"))
    assert ckpt.latest().name == "step_0000005"
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step never updated weights


def test_moe_aux_loss_is_added():
    model = tiny_model(n_experts=4, n_experts_per_tok=2)
    batch = pattern_batches(0)
    out = lm_loss(model, batch)
    loss, n = out.loss, out.count
    assert model.aux_loss is not None
    logits = model(batch["input_ids"])
    plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
    torch.testing.assert_close(loss, plain + model.aux_loss * n)


def write_tiny_recipe(tmp_path, shared_data, **extra) -> str:
    """A seconds-long recipe on the real tinyshakespeare text with a tiny model."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"""
out_dir: {tmp_path / 'run'}
model: {{spec: "preset:llama2c-stories260k", dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, hidden_dim: 64,
         max_seq_len: 32, dropout: 0.1}}
data: {{path: "${{data_dir}}/tinyshakespeare/input.txt", tokenizer: char, seq_len: 32, val_batches: 4,
        cache_dir: "{tmp_path / 'cache'}"}}
train: {{max_steps: 30, batch_size: 4, eval_every: 10, seed: 7}}
optim: {{lr: 3.0e-3}}
schedule: {{warmup_steps: 5, min_lr: 1.0e-4}}
precision: {{device: cpu, dtype: fp32}}
checkpoint: {{every: 10}}
logging: {{log_every: 1, progress: false, peak_tflops: 0.1}}
""")
    return str(recipe)


def test_run_recipe_writes_the_run_folder(tmp_path, shared_data):
    recipe = write_tiny_recipe(tmp_path, shared_data)
    out = run_recipe(recipe, ["sample.prompts=['ROMEO:']", "sample.max_new_tokens=20"])
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "samples.txt"} <= names
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "split" not in x]
    assert [x["step"] for x in train] == list(range(1, 31))
    assert set(train[0]) >= {"step", "loss", "ppl", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_mb",
                             "tokens_seen", "elapsed_s"}
    assert [x["step"] for x in lines if x.get("split") == "val"] == [10, 20, 30]
    assert train[-1]["loss"] < train[0]["loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]))
    assert summary["n_params"] > 0 and summary["tokens_seen"] == 30 * 4 * 32 and summary["wall_time_s"] > 0
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["best", "step_0000010", "step_0000020", "step_0000030"]
    from lmlab.weights.checkpoint import load_checkpoint

    assert load_checkpoint(out / "checkpoints" / "best").config.dim == 32
    assert (out / "samples.txt").read_text().startswith("### 'ROMEO:'\nROMEO:")
    before = (out / "summary.json").read_text()
    run_recipe(recipe)  # finished runs are left alone
    assert (out / "summary.json").read_text() == before


def test_tensorboard_logging_writes_the_scalars(tmp_path, shared_data):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = write_tiny_recipe(tmp_path, shared_data)
    out = run_recipe(recipe, ["train.max_steps=6", "train.eval_every=3", "logging.tensorboard=true"])
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr"} <= tags, tags
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 7))
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(x for x in logged if "split" not in x)
    assert events.Scalars("train/loss")[0].value == pytest.approx(first["loss"], rel=1e-6)
