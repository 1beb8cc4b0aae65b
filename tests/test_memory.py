"""The training-memory estimate (lmlab/train/memory.py) against what autograd really keeps, and `lmlab run
RECIPE --dry-run` on seed 001's 12 GB recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lmlab.model.attention as attention
from lmlab.cli import main
from lmlab.model.config import PRESETS, ModelConfig, get_preset
from lmlab.model.transformer import Transformer
from lmlab.train import memory
from lmlab.train.losses import lm_loss


def saved_bytes(model: Transformer, batch: int, seq_len: int, dtype: str) -> int:
    """Bytes of every tensor autograd saves for backward in one lm_loss forward (each storage once; the
    parameters themselves excluded), counted with saved-tensor hooks."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            lm_loss(model, {"input_ids": ids, "labels": torch.roll(ids, -1, 1)})
    return sum(seen.values())


SHAPES = [dict(dim=64, n_layers=2, n_heads=4), dict(dim=128, n_layers=3, n_heads=4, n_kv_heads=2),
          dict(dim=96, n_layers=2, n_heads=4, mlp="gelu", norm="layernorm", pos="learned", qkv_bias=True),
          dict(dim=128, n_layers=2, n_heads=4, vocab_size=2048, tie_embeddings=False)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("math_path", [False, True])
def test_the_estimate_counts_what_autograd_saves(shape, dtype: str, math_path: bool, monkeypatch) -> None:
    torch.set_num_threads(1)
    monkeypatch.setattr(attention, "MATH_ATTENTION_MAX_SCORES", 1 << 40 if math_path else 0)
    cfg = ModelConfig(**{"vocab_size": 512, "max_seq_len": 96, **shape})
    model = Transformer(cfg)
    est = memory.estimate_training_memory(cfg, 2, 96, dtype, math_attention=math_path)
    a = 4 if dtype == "fp32" else 2
    # saved: activations, autocast's weight copies, and the loss's d/d hidden and d/d head (its workspace and
    # head cast are live, not saved)
    want = est.activations + est.weight_copies + a * cfg.dim * (2 * 96 + cfg.vocab_size)
    assert want == pytest.approx(saved_bytes(model, 2, 96, dtype), rel=0.03)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameters_weights_gradients_and_adam_state(name: str) -> None:
    cfg = get_preset(name)
    with torch.device("meta"):
        n = Transformer(cfg).num_params()
    est = memory.estimate_training_memory(cfg, 1, 16)
    assert memory.total_params(cfg) == n
    assert (est.weights, est.gradients, est.optimizer) == (4 * n, 4 * n, 8 * n)
    lora = memory.estimate_training_memory(cfg, 1, 16, trainable=1000)
    assert (lora.gradients, lora.optimizer) == (4000, 8000)


def run(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exit_info:
        return exit_info.code
    return 0


def test_dry_run_of_the_12gb_recipe(tmp_path: Path, capsys) -> None:
    recipe = "recipes/pretrain/lm-max-rtx3060.yaml"
    assert run(["run", recipe, "--dry-run", "--device-memory", "12", f"out_dir={tmp_path / 'run'}"]) == 0
    out = capsys.readouterr().out
    c = get_preset("modern-decoder", dim=768, n_layers=12, n_heads=12, n_kv_heads=12, max_seq_len=1024,
                   vocab_size=50257)
    est = memory.estimate_training_memory(c, 8, 1024, "bf16")
    assert f"parameters: {memory.total_params(c):,} " in out and "micro-batch 8 x 1024 tokens, grad_accum 4" in out
    assert f"{'total':34s} {est.total / memory.GIB:8.2f} GiB" in out
    assert "fits in 12.0 GiB (--device-memory 12) with 10% headroom: yes" in out
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written
    assert run(["run", recipe, "--dry-run", "--device-memory", "4", f"out_dir={tmp_path / 'run'}"]) == 0
    assert "fits in 4.0 GiB (--device-memory 4) with 10% headroom: NO" in capsys.readouterr().out
    assert run(["run", recipe, "--dry-run", "train.batch_size=32", "--device-memory", "12"]) == 0
    assert "headroom: NO" in capsys.readouterr().out
