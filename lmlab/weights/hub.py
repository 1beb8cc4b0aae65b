"""Hugging Face hub names ("HuggingFaceTB/SmolLM2-135M") -> a local model folder.

This machine has no network, so this path is never exercised here (tests/test_weights_hub.py is a
skipped test that says so); it is kept so that lmlab works unchanged where the hub is reachable.
Only weights, config and tokenizer files are fetched (safetensors preferred): no repository code.
"""

from __future__ import annotations

import re
from pathlib import Path

from lmlab.errors import CheckpointError

HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
ALLOW = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
         "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
         "vocab.json", "merges.txt", "chat_template.jinja"]


def looks_like_hub_name(spec: str) -> bool:
    return HUB_NAME.fullmatch(spec) is not None and not spec.endswith((".gguf", ".bin", ".pt", ".json"))


def snapshot(name: str, revision: str | None = None) -> Path:
    """Download (or reuse the cached copy of) a hub repository's model files; the local folder.

    Cannot be tested on this machine (no network).
    """
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{name}: loading a hub model needs huggingface_hub "
                              "(pip install huggingface_hub)") from None
    try:
        folder = snapshot_download(repo_id=name, revision=revision, allow_patterns=ALLOW)
    except Exception as err:  # offline, unknown repo, gated repo: the hub client raises many types
        raise CheckpointError(
            f"{name!r} is not a local file or folder, and downloading it from the Hugging Face hub failed "
            f"({type(err).__name__}: {' '.join(str(err).split())})"  # one line: the client's messages span several
        ) from None
    folder = Path(folder)
    if not any(folder.glob("*.safetensors")):
        raise CheckpointError(f"{name}: the hub repository has no safetensors weights (pytorch_model.bin is not "
                              "downloaded: it is a pickle)")
    return folder
