"""Checkpoints that survive a crash, and exact resume.

A step checkpoint is a folder `checkpoints/step_XXXXXXX/` holding the model in lmlab's checkpoint
format (model.safetensors + config.json, via `lmlab.weights.checkpoint.save_checkpoint`, so any checkpoint
loads with `load_checkpoint`) plus `train_state.pt`: optimizer, gradient scaler, progress counters and
the RNG states (python, numpy, torch, CUDA) of every process. The folder is built under a temporary
name, fsynced and renamed, so a SIGKILL leaves either the whole checkpoint or none. The data position
needs no saving: batch sources are pure functions of the step (lmlab/data/pretrain.py) and schedules
pure functions of the step (lmlab/train/schedule.py).
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmlab.errors import CheckpointError
from lmlab.fileio import atomic_replace_dir
from lmlab.model.transformer import unwrap
from lmlab.weights.build import load_state_into, nonfinite_tensors
from lmlab.weights.checkpoint import WEIGHTS, save_checkpoint

STATE_FILE = "train_state.pt"
TRAINABLE_FILE = "trainable.safetensors"  # adapter-only checkpoints: the frozen base is not copied
_STEP_DIR = re.compile(r"^step_(\d{7})$")
_OWN = re.compile(r"^(step_\d{7}|best)$")  # the folder names a Checkpointer writes


@dataclass
class Progress:
    """Counters that continue across a resume."""

    step: int = 0
    """Optimizer steps completed."""
    tokens_seen: int = 0
    """Input tokens processed (all processes)."""
    elapsed_s: float = 0.0
    """Training wall time before this process started."""
    best_metric: float | None = None
    """Best value of the selection metric so far (lowest validation loss, highest dev accuracy, ...)."""
    best_step: int = 0
    """Step at which it was reached."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Progress:
        """Counters saved by this or an earlier version (which kept `best_val_loss`)."""
        data = dict(data)
        if "best_val_loss" in data:
            best = data.pop("best_val_loss")
            data.setdefault("best_metric", best if math.isfinite(best) else None)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def capture_rng() -> dict[str, Any]:
    """This process's RNG states, as tensors and ints (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x: Any) -> Any:
    """random.setstate wants tuples; serialization may have turned them into lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _gather_rng() -> list[dict[str, Any]]:
    """RNG states of all processes (rank order), so each resumes its own dropout stream."""
    mine = capture_rng()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [mine]
    states: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, mine)
    return states


class Checkpointer:
    """Writes step and best checkpoints under `folder` (rank 0 only) and finds the newest one."""

    def __init__(self, folder: str | Path, tokenizer: Any = None, keep_last: int = 0, is_main: bool = True,
                 trainable_only: bool = False):
        self.folder, self.tokenizer, self.keep_last, self.is_main = Path(folder), tokenizer, keep_last, is_main
        self.trainable_only = trainable_only  # LoRA: save the parameters that train, not the whole model

    def save(self, name: str, model: nn.Module, optimizer: torch.optim.Optimizer, progress: Progress,
             scaler: Any = None, meta: dict[str, Any] | None = None) -> Path | None:
        """Atomically write checkpoints/<name>/ (name: step_XXXXXXX or best)."""

        rng = _gather_rng()  # collectives: every rank calls save
        if self.trainable_only:
            model, optim_state = unwrap(model), optimizer.state_dict()
        else:
            model, optim_state = _full_states(model, optimizer)
        if not self.is_main:
            return None
        bad = nonfinite_parameters(model, trainable_only=self.trainable_only)
        if bad:
            raise CheckpointError(f"not writing {self.folder / name}: parameters {bad[:4]} hold NaN/inf values; "
                                  f"the last good checkpoint is {self.latest() or 'none'}")
        state = {"progress": asdict(progress), "optimizer": optim_state, "rng": rng,
                 "scaler": scaler.state_dict() if scaler is not None else None}

        def build(tmp: Path) -> None:
            if self.trainable_only:
                trainable = {k: p.detach().cpu().contiguous() for k, p in model.named_parameters() if p.requires_grad}
                save_file(trainable, str(tmp / TRAINABLE_FILE))
            else:
                save_checkpoint(model, tmp, tokenizer=self.tokenizer)
            torch.save(state, tmp / STATE_FILE)
            (tmp / "meta.json").write_text(json.dumps({"step": progress.step, **(meta or {})}, indent=2))

        target = self.folder / name
        atomic_replace_dir(build, target)
        self._prune()
        return target

    def clean(self) -> list[str]:
        """Remove the temporary folders a killed save leaves (`.step_XXXXXXX.*`, `.best.*`; lmlab's own
        names only) and put back a checkpoint whose swap was interrupted; returns what was removed."""
        removed: list[str] = []
        if not (self.is_main and self.folder.is_dir()):
            return removed
        for old in self.folder.glob(".*.old"):
            target = self.folder / old.name[1:-4]
            if _OWN.match(target.name) and not target.exists() and old.is_dir():
                old.rename(target)
        for tmp in self.folder.iterdir():
            if tmp.is_dir() and tmp.name.startswith(".") and _OWN.match(tmp.name[1:].split(".")[0]):
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp.name)
        return removed

    def step_name(self, step: int) -> str:
        return f"step_{step:07d}"

    def step_dirs(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))

    def latest(self) -> Path | None:
        dirs = [d for d in self.step_dirs() if (d / STATE_FILE).is_file()]
        return dirs[-1] if dirs else None

    def _prune(self) -> None:
        if self.keep_last > 0:
            for old in self.step_dirs()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)


def nonfinite_parameters(model: nn.Module, trainable_only: bool = False) -> list[str]:
    """Names of parameters holding NaN or inf (a diverged update must never be saved as a checkpoint)."""
    return nonfinite_tensors({k: p.detach() for k, p in model.named_parameters() if p.requires_grad or not trainable_only})


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _full_states(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, dict]:
    """The module and optimizer state to save. Under FSDP both are sharded: gather full copies to
    rank 0 (a collective) and put the weights into a plain CPU model there."""

    raw = unwrap(model)
    if not _is_sharded(raw):
        return raw, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights, optim_state = get_state_dict(raw, optimizer, options=full)
    if torch.distributed.get_rank() != 0:
        return raw, {}
    plain = type(raw)(raw.config)
    plain.load_state_dict(weights)
    return plain, optim_state


def load_train_state(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                     scaler: Any = None, rank: int = 0) -> Progress:
    """Restore weights, optimizer, scaler and this rank's RNG from a step checkpoint."""
    folder = Path(folder)
    state = _read(folder, STATE_FILE, lambda f: torch.load(f, map_location="cpu", weights_only=True))
    if not isinstance(state, dict) or not {"progress", "optimizer", "rng", "scaler"} <= state.keys():
        raise CheckpointError(f"{folder / STATE_FILE}: not an lmlab training state (expected progress, optimizer, "
                              "rng and scaler)")
    raw = unwrap(model)
    if _is_sharded(raw) and not (folder / TRAINABLE_FILE).is_file():  # FSDP: every rank keeps its shard
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        weights = _read(folder, WEIGHTS, lambda f: load_file(str(f)))
        if raw.config.tie_embeddings:
            weights["output.weight"] = weights["tok_embeddings.weight"]
        for group in optimizer.param_groups:  # saved groups carry fit's initial_lr; the keys must match
            group.setdefault("initial_lr", group["lr"])
        set_state_dict(raw, optimizer, model_state_dict=weights, optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    else:
        load_weights(folder, raw)
        optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    rngs = state["rng"]
    restore_rng(rngs[rank] if rank < len(rngs) else rngs[0])
    return Progress.from_dict(state["progress"])


def load_weights(folder: str | Path, model: nn.Module) -> None:
    """Put a checkpoint's weights into `model`: the whole model, or (an adapter or head checkpoint)
    exactly the parameters that train, matched by name."""
    folder, raw = Path(folder), unwrap(model)
    if (folder / TRAINABLE_FILE).is_file():
        weights = _read(folder, TRAINABLE_FILE, lambda f: load_file(str(f)))
        if nonfinite_tensors(weights):
            raise CheckpointError(f"{folder / TRAINABLE_FILE}: {nonfinite_tensors(weights)[:4]} hold NaN or inf values")
        params = {k: p for k, p in raw.named_parameters() if p.requires_grad}
        if params.keys() != weights.keys():
            missing, extra = sorted(params.keys() - weights.keys()), sorted(weights.keys() - params.keys())
            raise CheckpointError(f"{folder / TRAINABLE_FILE}: does not match the trainable parameters "
                                  f"(missing {missing[:5]}, unexpected {extra[:5]}); was the LoRA config changed?")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(weights[k])
        return
    weights = _read(folder, WEIGHTS, lambda f: load_file(str(f)))
    device = next(raw.parameters()).device
    load_state_into(raw, {k: v.to(device) for k, v in weights.items()}, str(folder / WEIGHTS))


def _read(folder: Path, name: str, read: Any) -> Any:
    """read(folder / name), with an unreadable or truncated file as a CheckpointError naming it."""
    try:
        return read(folder / name)
    except Exception as err:  # a damaged file fails in many ways (struct.error, BadZipFile, ...): all unreadable
        raise CheckpointError(f"{folder / name}: unreadable checkpoint file ({' '.join(str(err).split())[:200]})") from None
