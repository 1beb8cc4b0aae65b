"""Small helpers shared by the tests (imported as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import json
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


def hh_pairs(shared_data: Path, tmp_path: Path, n: int) -> Path:
    """The first n HH-RLHF harmless pairs as a JSONL file of their own (a tiny preference run's data)."""
    lines = (shared_data / "hh-rlhf-harmless-base" / "test.jsonl").read_text().splitlines()[:n]
    data = tmp_path / "hh.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data


def val_rows(run: Path) -> list[dict]:
    """A run's validation rows of metrics.jsonl, in step order."""
    rows = (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if r.get("split") == "val"]
