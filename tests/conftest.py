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


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine the thread hand-off dominates
    (modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smol_tok():
    """The embedded SmolLM2's tokenizer (read once per session)."""
    from lmlab.paths import smollm2_gguf
    from lmlab.tokenization import load_tokenizer

    return load_tokenizer(smollm2_gguf())
