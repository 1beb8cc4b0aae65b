"""Small helpers shared by the tests (imported as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path

from lmlab.schema.load import load_config
from lmlab.schema.pretrain import PretrainConfig
from lmlab.tasks.pretrain import run_pretrain


def run_recipe(path: str | Path | None, overrides: list[str] = ()) -> Path:
    """`lmlab run RECIPE overrides...` in this process; returns the run folder."""
    return run_pretrain(load_config(path, list(overrides), schema=PretrainConfig))
