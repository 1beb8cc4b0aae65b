"""lmlab's own model checkpoint: a folder with `model.safetensors` + `config.json` (+ tokenizer files).

The raw module's state dict is saved (never a compiled/DDP wrapper: no `_orig_mod.`/`module.` prefixes),
tied output weights are stored once, and the folder is written atomically. Loading rebuilds the model
from config.json and reads weights through safetensors, so nothing in a checkpoint is executed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmlab.errors import CheckpointError
from lmlab.fileio import write_output_dir
from lmlab.model.config import ModelConfig
from lmlab.model.transformer import Transformer, unwrap
from lmlab.weights.build import build_model

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors of the raw module, tied output weight dropped."""
    model = unwrap(model)
    state = model.state_dict()
    if getattr(model.config, "tie_embeddings", False):
        state.pop("output.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


CHECKPOINT_KIND = "lmlab checkpoint"


def save_checkpoint(
    model: nn.Module, directory: str | Path, tokenizer: Any = None, metadata: dict[str, str] | None = None,
    *, force: bool = False,
) -> Path:
    """Write model (and tokenizer) to `directory`: a new folder, or one holding an earlier lmlab checkpoint
    (replaced); a folder with anything else is refused unless `force` (lmlab.fileio.write_output_dir)."""
    directory = Path(directory)
    raw = unwrap(model)
    state = model_state(raw)

    def build(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "lmlab", **(metadata or {})})
        raw.config.save(tmp / CONFIG)
        if tokenizer is not None:
            tokenizer.save(tmp)

    write_output_dir(build, directory, CHECKPOINT_KIND, force=force, legacy=is_checkpoint)
    return directory


def is_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / WEIGHTS).is_file() and (path / CONFIG).is_file() and _is_lmlab_config(path / CONFIG)


def _is_lmlab_config(path: Path) -> bool:
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return "dim" in data and "n_layers" in data  # HF configs say hidden_size / num_hidden_layers


def load_checkpoint(
    directory: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Transformer:
    """Rebuild the model from config.json and fill it from model.safetensors (dtype None: as stored)."""
    directory = Path(directory)
    if not (directory / CONFIG).is_file():
        raise CheckpointError(f"{directory}: no {CONFIG}; expected an lmlab checkpoint folder")
    config = ModelConfig.load(directory / CONFIG)
    try:
        state = load_file(str(directory / WEIGHTS))
    except FileNotFoundError:
        raise CheckpointError(f"{directory / WEIGHTS}: not found") from None
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{directory / WEIGHTS}: unreadable or truncated safetensors file ({err})") from None

    return build_model(config, state, str(directory / WEIGHTS), device=device, dtype=dtype)
