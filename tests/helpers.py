"""Small helpers shared by the tests (imported as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path

import torch

from lmlab.model.config import ModelConfig
from lmlab.model.transformer import Transformer
from lmlab.schema.load import load_config
from lmlab.schema.pretrain import PretrainConfig
from lmlab.tasks.pretrain import run_pretrain


def run_recipe(path: str | Path | None, overrides: list[str] = ()) -> Path:
    """`lmlab run RECIPE overrides...` in this process; returns the run folder."""
    return run_pretrain(load_config(path, list(overrides), schema=PretrainConfig))


def tiny_smol(vocab: int = 49152, seed: int | None = None) -> Transformer:
    """A 2-layer GQA model with SmolLM2's vocabulary, for tests that encode with its tokenizer (seeded first
    when `seed` is given)."""
    if seed is not None:
        torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                                   max_seq_len=512))
