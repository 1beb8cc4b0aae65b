"""Shared test fixtures: the real datasets and checkpoints in ../shared/data, tiny model configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmlab.paths import data_dir


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (or $LMLAB_DATA). Missing data is a failure, not a skip: CI always has it."""
    return data_dir()


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def cli_world(tmp_path_factory) -> dict[str, str]:
    """Tiny models, a corpus, recipes and finished runs for the command-line reliability tests
    (tests/cli_world.py); built once, only read."""
    from cli_world import build_world

    return build_world(tmp_path_factory.mktemp("cli-world"))
