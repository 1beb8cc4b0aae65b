"""Saving and loading LoRA adapters: lmlab's own files, merged checkpoints, and the peft format.

lmlab adapter folder: `adapter.safetensors` (`<path>.lora_a.weight`, `<path>.lora_b.weight` and the
`trainable` modules' tensors) + `adapter_config.json` (the LoRAConfig and the base model's config).
A merged save is a normal lmlab checkpoint (lmlab/weights/checkpoint.py) that loads as a plain Transformer;
both can live in one folder since their file names differ.

peft folder (Hugging Face): `adapter_model.safetensors` with keys
`base_model.model.<hf module>.lora_A.weight` + `adapter_config.json` with `peft_type: LORA`. Module
names follow transformers' Llama (`model.layers.N.self_attn.q_proj`, `mlp.gate_proj`, `lm_head`). lmlab
keeps wq/wk rows in Meta's interleaved RoPE layout while HF uses rotate-half, so LoRA B of wq and wk
(whose rows are the output features) is row-permuted exactly as the base weights are, with the same
functions (lmlab.weights.to_rotate_half / to_interleaved); A is untouched.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmlab.adapters.lora import (
    DEFAULT,
    LoRAConfig,
    adapter_config,
    add_adapter,
    lora_modules,
    lora_state_dict,
    merge_and_unload,
)
from lmlab.errors import CheckpointError, ConfigError
from lmlab.fileio import write_output_dir
from lmlab.model.transformer import unwrap
from lmlab.weights.build import to_interleaved, to_rotate_half
from lmlab.weights.checkpoint import save_checkpoint
from lmlab.weights.hf import LLAMA_LAYER, LLAMA_TOP, hf_family  # the one lmlab <-> HF name table

WEIGHTS = "adapter.safetensors"
CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
FORMAT = "lmlab-lora"
_TO_HF_LAYER = {v: k for k, v in LLAMA_LAYER.items()}
_TO_HF_TOP = {v: k for k, v in LLAMA_TOP.items()}


# ---------------------------------------------------------------- lmlab's own adapter files

def _write_adapter(model: nn.Module, folder: Path, name: str | None) -> None:
    raw = unwrap(model)
    cfg = adapter_config(raw, name)
    state = lora_state_dict(raw, name)
    base = getattr(raw, "config", None)
    meta = {
        "format": FORMAT,
        "lora": cfg.to_dict(),
        "trainable_weights": sorted(k for k in state if ".lora_a." not in k and ".lora_b." not in k),
        "base_model": base.to_dict() if hasattr(base, "to_dict") else None,
    }
    save_file(state, str(folder / WEIGHTS), metadata={"format": FORMAT})
    (folder / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def _is_lmlab_adapter(folder: Path) -> bool:
    """An adapter folder an lmlab without output markers wrote (its config says format lmlab-lora)."""
    try:
        return json.loads((folder / CONFIG).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def save_adapter(model: nn.Module, directory: str | Path, name: str | None = None) -> Path:
    """Write adapter `name` (default: the active one) with its config (an earlier adapter in the folder
    is replaced; anything else there is refused: lmlab.fileio.write_output_dir)."""
    write_output_dir(lambda tmp: _write_adapter(model, tmp, name), Path(directory), "LoRA adapter",
                     legacy=_is_lmlab_adapter)
    return Path(directory)


def _write_merged(model: nn.Module, folder: Path, tokenizer: Any) -> None:
    raw = unwrap(model)
    if not hasattr(raw, "config"):
        raise ConfigError("saving merged weights needs the Transformer itself (the module with .config)")
    save_checkpoint(merge_and_unload(copy.deepcopy(raw)), folder, tokenizer=tokenizer)


def save_merged(model: nn.Module, directory: str | Path, tokenizer: Any = None) -> Path:
    """The active adapter folded into a copy of the base: a plain lmlab checkpoint (nn.Linear again).
    The model itself is left as it was."""
    _write_merged(model, Path(directory), tokenizer)
    return Path(directory)


def save_lora(
    model: nn.Module, directory: str | Path, *, adapter: bool = True, merged: bool = False, tokenizer: Any = None
) -> Path:
    """Save the adapter alone, the merged weights, or both in one folder (their file names differ),
    replacing an earlier one there (lmlab.fileio.write_output_dir)."""
    def build(tmp: Path) -> None:
        if merged:
            _write_merged(model, tmp, tokenizer)
        if adapter:
            _write_adapter(model, tmp, None)

    write_output_dir(build, Path(directory), "LoRA adapter", legacy=_is_lmlab_adapter)
    return Path(directory)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found; expected an adapter folder ({CONFIG} + weights)") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable or truncated safetensors file ({err})") from None


def load_adapter(model: nn.Module, directory: str | Path, name: str = DEFAULT) -> nn.Module:
    """Add the adapter saved in `directory` (lmlab or peft format) as `name`, active. Returns the model."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: {'not a folder' if directory.exists() else 'no such folder'}; "
                              f"expected an adapter folder ({CONFIG} + weights)")
    meta = _read_json(directory / CONFIG)
    if meta.get("peft_type") is not None:
        return import_peft(model, directory, name=name)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory / CONFIG}: not an lmlab or peft adapter config (no format/peft_type)")
    cfg = LoRAConfig.from_dict(meta["lora"], source=str(directory / CONFIG))
    tensors = _read_tensors(directory / WEIGHTS)
    add_adapter(model, name, cfg)
    _fill(model, name, tensors, str(directory / WEIGHTS))
    return model


def _fill(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy saved tensors into the freshly added adapter `name`; names and shapes must match exactly."""
    raw = unwrap(model)
    expected = lora_state_dict(raw, name)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: adapter does not fit this model: missing {missing[:6]}, unexpected {unexpected[:6]}"
        )
    layers = dict(lora_modules(raw))
    params = dict(raw.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for key, tensor in tensors.items():
            if tensor.shape != expected[key].shape:
                raise CheckpointError(
                    f"{source}: tensor {key} has shape {tuple(tensor.shape)}, the model expects "
                    f"{tuple(expected[key].shape)} (a different base model or rank?)"
                )
            path, _, leaf = key.rpartition(".")
            mod_path, _, which = path.rpartition(".")
            if which in ("lora_a", "lora_b") and mod_path in layers and leaf == "weight":
                getattr(layers[mod_path], which)[name].weight.copy_(tensor)
            else:
                params[key].copy_(tensor)


# ---------------------------------------------------------------- peft interop

def hf_module_name(path: str) -> str:
    """lmlab module path -> transformers Llama path (`layers.0.attention.wq` -> `model.layers.0.self_attn.q_proj`)."""
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", path)
    if m and m.group(2) in _TO_HF_LAYER:
        return f"model.layers.{m.group(1)}.{_TO_HF_LAYER[m.group(2)]}"
    if path in _TO_HF_TOP:
        return _TO_HF_TOP[path]
    raise ConfigError(f"{path!r} has no Hugging Face Llama counterpart (known: {sorted(_TO_HF_LAYER)}, output)")


def lmlab_module_name(hf: str) -> str:
    """transformers Llama module path -> lmlab module path."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf)
    if m and m.group(2) in LLAMA_LAYER:
        return f"layers.{m.group(1)}.{LLAMA_LAYER[m.group(2)]}"
    if hf in LLAMA_TOP:
        return LLAMA_TOP[hf]
    raise ConfigError(f"{hf!r} is not a Llama module lmlab knows ({sorted(LLAMA_LAYER)}, lm_head)")


def _llama_base(model: nn.Module) -> nn.Module:
    """The Transformer itself, checked to be one whose HF twin uses Llama module names."""
    raw = unwrap(model)
    config = getattr(raw, "config", None)
    if config is None or not hasattr(config, "n_kv_heads"):
        raise ConfigError("peft export/import needs the lmlab Transformer itself (the module with .config)")
    family = hf_family(config)
    if family == "gpt2":
        raise ConfigError("peft export/import supports Llama-family models (HF GPT-2 fuses q, k, v in c_attn)")
    return raw


def peft_unsupported(model: nn.Module) -> str | None:
    """Why `export_peft` cannot write this model's adapters (attention sinks, experts, GPT-2's fused
    attention: Hugging Face has no such module), or None when it can."""
    try:
        _llama_base(model)
    except ConfigError as err:
        return str(err)
    return None


def _rope_heads(model: nn.Module, path: str) -> int | None:
    """Heads to permute over for LoRA B of this module (None when its rows carry no RoPE)."""
    c = model.config
    if c.pos != "rope":
        return None
    return {"wq": c.n_heads, "wk": c.n_kv_heads}.get(path.rsplit(".", 1)[-1])


def _peft_config(cfg: LoRAConfig, targets: list[str], base_name: str | None) -> dict[str, Any]:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.use_rslora,
        "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "use_dora": False, "lora_bias": False,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
        "revision": None,
    }


def export_peft(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None,
                name: str | None = None) -> Path:
    """Write adapter `name` as a peft LoRA folder loadable by `peft.PeftModel.from_pretrained`."""
    raw = _llama_base(model)
    cfg = adapter_config(raw, name)
    if cfg.trainable:
        raise ConfigError(f"lora.trainable={cfg.trainable}: modules outside the base model have no peft/HF "
                          "counterpart; export without them (or save with save_adapter)")
    tensors: dict[str, torch.Tensor] = {}
    for key, t in lora_state_dict(raw, name).items():
        path, which = key.removesuffix(".weight").rsplit(".", 1)  # ("layers.0.attention.wq", "lora_b")
        heads = _rope_heads(raw, path)
        if which == "lora_b" and heads:
            t = to_rotate_half(t, heads)
        ab = "lora_A" if which == "lora_a" else "lora_B"
        tensors[f"base_model.model.{hf_module_name(path)}.{ab}.weight"] = t.contiguous()
    hf_paths = sorted({k.removeprefix("base_model.model.").rsplit(".", 2)[0] for k in tensors})
    if all("." not in t for t in cfg.target_modules):  # leaf names cover every layer: keep them short
        targets = sorted({p.rsplit(".", 1)[-1] for p in hf_paths})
    else:
        targets = hf_paths
    config = _peft_config(cfg, targets, base_model_name_or_path)

    def build(tmp: Path) -> None:
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    write_output_dir(build, Path(out_dir), "peft adapter")
    return Path(out_dir)


def _check_peft_config(meta: dict[str, Any], source: str) -> LoRAConfig:
    """The peft config as a LoRAConfig; features lmlab's LoRA does not have are errors, never ignored."""
    if meta.get("peft_type") != "LORA":
        raise CheckpointError(f"{source}: peft_type={meta.get('peft_type')!r}; only LORA adapters import")
    unsupported = {
        "use_dora": bool(meta.get("use_dora")), "fan_in_fan_out": bool(meta.get("fan_in_fan_out")),
        "bias": meta.get("bias", "none") != "none", "lora_bias": bool(meta.get("lora_bias")),
        "modules_to_save": bool(meta.get("modules_to_save")), "rank_pattern": bool(meta.get("rank_pattern")),
        "alpha_pattern": bool(meta.get("alpha_pattern")),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise CheckpointError(f"{source}: unsupported peft LoRA option(s) {bad}={[meta.get(k) for k in bad]}")
    if "r" not in meta or "lora_alpha" not in meta:
        raise CheckpointError(f"{source}: a peft LoRA config needs `r` and `lora_alpha`")
    return LoRAConfig(
        rank=int(meta["r"]), alpha=float(meta["lora_alpha"]), dropout=float(meta.get("lora_dropout", 0.0)),
        use_rslora=bool(meta.get("use_rslora", False)),
    )


def import_peft(model: nn.Module, adapter_dir: str | Path, name: str = DEFAULT) -> nn.Module:
    """Add a peft LoRA folder (Llama module names) to an lmlab model as adapter `name`, active."""
    adapter_dir = Path(adapter_dir)
    cfg = _check_peft_config(_read_json(adapter_dir / CONFIG), str(adapter_dir / CONFIG))
    weights = adapter_dir / PEFT_WEIGHTS
    if not weights.is_file() and (adapter_dir / "adapter_model.bin").is_file():
        raise CheckpointError(f"{adapter_dir}: only adapter_model.bin (pickle); lmlab reads safetensors only, "
                              "re-save with save_pretrained(safe_serialization=True)")
    tensors: dict[str, torch.Tensor] = {}
    for key, t in _read_tensors(weights).items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
        if not m:
            raise CheckpointError(f"{weights}: tensor {key!r} is not a LoRA A/B weight of a linear layer")
        try:
            path = lmlab_module_name(m.group(1))
        except ConfigError as err:
            raise CheckpointError(f"{weights}: tensor {key!r}: {err}") from None
        which = "lora_a" if m.group(2) == "A" else "lora_b"
        tensors[f"{path}.{which}.weight"] = t
    cfg.target_modules = sorted({k.rsplit(".", 2)[0] for k in tensors})
    raw = _llama_base(model)
    for key in list(tensors):
        path = key.rsplit(".", 2)[0]
        heads = _rope_heads(raw, path)
        if key.endswith("lora_b.weight") and heads:
            tensors[key] = to_interleaved(tensors[key], heads)
    add_adapter(model, name, cfg)
    _fill(model, name, tensors, str(weights))
    return model


__all__ = [
    "save_adapter", "save_merged", "save_lora", "load_adapter", "export_peft", "import_peft", "peft_unsupported",
    "hf_module_name", "lmlab_module_name",
]
