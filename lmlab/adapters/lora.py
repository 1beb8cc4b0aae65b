"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), injected by module name.

    h = W0 x + (alpha / r) * B A dropout(x)      (rsLoRA, Kalajdzievski 2023: alpha / sqrt(r))

A is Kaiming-uniform and B is zero, so a freshly adapted model computes exactly what the base did.
`apply_lora` swaps the matching `nn.Linear` children for `LoRALinear` after the model is built: no forked
model classes, and the base keys (`layers.0.attention.wq.weight`) keep their names, so base checkpoints
load unchanged. Each LoRALinear holds its adapters in ModuleDicts keyed by adapter name, as peft does:
in memory `wq.lora_a.<name>.weight`; saved (lora_state_dict) without the name, `wq.lora_a.weight`, which
maps 1:1 to peft's `base_model.model.<hf path>.lora_A.weight` (lmlab/adapters/files.py). One adapter is
active at a time, so a router can switch task adapters on one loaded base; `adapters_per_row` instead gives
each batch row its own adapter for one forward (a server's mixed batch: the base matmul once, each adapter's
low-rank update on its rows only, as S-LoRA / punica gather them). `disable_lora` runs the base model alone
(DPO's reference model for free). The model file never imports this one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.errors import ConfigError
from lmlab.model.transformer import unwrap
from lmlab.schema.sections import LoRAConfig

DEFAULT = "default"
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class LoRALinear(nn.Module):
    """nn.Linear plus named low-rank adapters; `weight` and `bias` keep nn.Linear's names.

    The base weight and bias are the very Parameters of the replaced layer (not copies), so tied weights
    stay tied and no memory is duplicated. `merged` names the adapter folded into `weight`, if any.
    """

    def __init__(
        self, base: nn.Linear, rank: int | None = None, alpha: float = 16.0, dropout: float = 0.0,
        use_rslora: bool = False, name: str = DEFAULT,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        self.lora_a = nn.ModuleDict()
        self.lora_b = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active: str | None = None
        self.merged: str | None = None
        self.train(base.training)  # an adapter added to a model in eval mode must not start dropping out
        self.disabled = False
        self.row_groups: list[tuple[str, torch.Tensor | None]] | None = None  # set by adapters_per_row
        if rank is not None:
            self.add_adapter(name, rank, alpha, dropout, use_rslora)

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False) -> None:
        """A new adapter (A Kaiming-uniform as in microsoft/LoRA, B zero); active if none was."""
        kw = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.lora_a[name] = nn.Linear(self.in_features, rank, bias=False, **kw)
        self.lora_b[name] = nn.Linear(rank, self.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_a[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b[name].weight)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout else nn.Identity()
        for part in (self.lora_a, self.lora_b, self.lora_dropout):  # new modules start in training mode
            part[name].train(self.training)
        self.scaling[name] = alpha / (math.sqrt(rank) if use_rslora else rank)
        if self.active is None:
            self.active = name

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B @ A in fp32, shape (out, in): what merging adds to `weight`."""
        b, a = self.lora_b[name].weight.float(), self.lora_a[name].weight.float()
        return self.scaling[name] * (b @ a)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapter into `weight`: inference then costs one matmul, as the base."""
        if self.merged is None and self.active is not None:
            self.weight.add_(self.delta_weight(self.active).to(self.weight.dtype))
            self.merged = self.active

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged adapter again (the original weight up to rounding)."""
        if self.merged is not None:
            self.weight.sub_(self.delta_weight(self.merged).to(self.weight.dtype))
            self.merged = None

    def set_active(self, name: str | None) -> None:
        """Switch adapters (None = base only); a merged layer is re-merged with the new one."""
        remerge = self.merged is not None
        self.unmerge()
        self.active = name if name in self.lora_a else None
        if remerge:
            self.merge()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged is not None:
            if self.disabled:
                raise RuntimeError("LoRALinear is merged and disabled: unmerge first (disable_lora does)")
            return out
        if self.disabled:
            return out
        if self.row_groups is not None:
            return self._per_row(x, out)
        name = self.active
        if name is None:
            return out
        dropout = self.lora_dropout[name]
        if self.training and isinstance(dropout, nn.Dropout):  # no dropout kernel at all when p = 0
            x = F.dropout(x, dropout.p, training=True)
        return lora_update(out, x, self.lora_a[name].weight, self.lora_b[name].weight, self.scaling[name])

    def _per_row(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Each group's (adapter name, batch rows; None = all rows) low-rank update, added to its rows."""
        for name, rows in self.row_groups:
            if name not in self.lora_a:
                continue
            xs = x if rows is None else x[rows]
            lora = self.scaling[name] * self.lora_b[name](self.lora_a[name](self.lora_dropout[name](xs)))
            out = out + lora if rows is None else out.index_add(0, rows, lora.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"adapters={list(self.lora_a)}, active={self.active!r}"
        )


def lora_update(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """out + scaling * (x A^T) B^T in two matmuls, the second accumulating into out (one addmm: no
    separate scale and add passes over the (tokens, out) result, forward or backward)."""
    xa = F.linear(x, a).reshape(-1, a.shape[0])  # (tokens, r)
    return torch.addmm(out.reshape(-1, out.shape[-1]), xa, b.t(), alpha=scaling).view(out.shape)


def cast_frozen_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store the frozen linear weights (the base of LoRA training) in the matmul dtype, e.g. bf16 under bf16
    autocast: autocast then has nothing to cast each step, and they take half the memory. Tied weights
    (the embedding / output head) and trainable ones keep their dtype. Merging then rounds to `dtype`."""
    shared = _shared_weights(unwrap(model))
    for module in unwrap(model).modules():
        if isinstance(module, (nn.Linear, LoRALinear)) and not module.weight.requires_grad \
                and id(module.weight) not in shared and module.weight.dtype != dtype:
            module.weight.data = module.weight.data.to(dtype)
            if module.bias is not None and not module.bias.requires_grad:
                module.bias.data = module.bias.data.to(dtype)
    return model


@dataclass
class LoRAState:
    """Per-model bookkeeping, kept on the root module as `model.lora_state`."""

    configs: dict[str, LoRAConfig] = field(default_factory=dict)
    active: str | None = None
    stash: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """Each adapter's copy of its `trainable` modules' weights, swapped in when it becomes active."""


def lora_state(model: nn.Module) -> LoRAState:
    """The model's adapters; a ConfigError if LoRA was never applied to it."""
    state = getattr(unwrap(model), "lora_state", None)
    if state is None:
        raise ConfigError("this model has no LoRA adapters: call lmlab.adapters.lora.apply_lora(model, cfg) first")
    return state


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(path, layer) for every LoRALinear under model."""
    for path, module in unwrap(model).named_modules():
        if isinstance(module, LoRALinear):
            yield path, module


def _matches(path: str, names: list[str]) -> bool:
    return any(path == n or path.endswith("." + n) for n in names)


def _find(model: nn.Module, names: list[str], kind: type | tuple[type, ...], key: str) -> list[str]:
    """Paths of `kind` modules matching `names`; a name that matches nothing is a ConfigError."""
    paths = [p for p, m in model.named_modules() if p and isinstance(m, kind)]
    found = [p for p in paths if _matches(p, names)]
    for n in names:
        if not any(_matches(p, [n]) for p in found):
            leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
            raise ConfigError(f"lora.{key}: {n!r} matches no suitable module in the model; names there: {leaves}")
    return found


def add_adapter(model: nn.Module, name: str, cfg: LoRAConfig) -> nn.Module:
    """Add a fresh adapter `name` and activate it (saved adapters: `lmlab.adapters.files.load_adapter`).

    Matching nn.Linear children are replaced in place by LoRALinear; everything but the active
    adapter and its `trainable` modules is frozen. Returns the same model.
    """
    raw = unwrap(model)
    if not _NAME.match(name) or hasattr(nn.ModuleDict(), name):
        raise ConfigError(f"adapter name {name!r}: expected letters, digits, '_' or '-' (and not a dict method)")
    state = getattr(raw, "lora_state", None) or LoRAState()
    if name in state.configs:
        raise ConfigError(f"adapter {name!r} already exists on this model; adapters: {list(state.configs)}")
    targets = _find(raw, cfg.target_modules, (nn.Linear, LoRALinear), "target_modules")
    _find(raw, cfg.trainable, nn.Module, "trainable")
    for path in targets:
        layer = raw.get_submodule(path)
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear(layer)
            parent, _, child = path.rpartition(".")
            setattr(raw.get_submodule(parent), child, layer)
        layer.add_adapter(name, cfg.rank, cfg.alpha, cfg.dropout, cfg.use_rslora)
    state.configs[name] = cfg
    raw.lora_state = state
    set_active_adapter(raw, name)
    return model


def apply_lora(model: nn.Module, cfg: LoRAConfig | None = None, name: str = DEFAULT) -> nn.Module:
    """Inject one adapter (the simple, default case) and freeze the base. Returns the same model."""
    return add_adapter(model, name, cfg or LoRAConfig())


def _trainable_params(model: nn.Module, cfg: LoRAConfig) -> dict[str, nn.Parameter]:
    """State-dict names -> Parameters of the `trainable` modules (adapter weights excluded)."""
    out: dict[str, nn.Parameter] = {}
    for path in _find(model, cfg.trainable, nn.Module, "trainable"):
        for pname, p in model.get_submodule(path).named_parameters():
            if not pname.split(".")[0].startswith("lora_"):
                out[f"{path}.{pname}"] = p
    return out


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Switch every LoRA layer to adapter `name` (None = the base alone) without reloading the base.

    Only the active adapter (and its trainable modules) requires grad; each adapter's trainable modules
    (e.g. its classification head) are swapped in from its stash. Not thread-safe: one request at a time.
    """
    raw, state = unwrap(model), lora_state(model)
    if name is not None and name not in state.configs:
        raise ConfigError(f"unknown adapter {name!r}; adapters on this model: {list(state.configs)}")
    if state.active is not None and state.configs[state.active].trainable:  # keep its head's latest weights
        params = _trainable_params(raw, state.configs[state.active])
        state.stash[state.active] = {k: p.detach().clone() for k, p in params.items()}
    if name is not None and name in state.stash:
        with torch.no_grad():
            for key, p in _trainable_params(raw, state.configs[name]).items():
                p.copy_(state.stash[name][key])
    was_merged = any(layer.merged is not None for _, layer in lora_modules(raw))
    unmerge_lora(raw)
    for _, layer in lora_modules(raw):
        layer.set_active(name)
    state.active = name
    if was_merged:  # a merged model stays merged, now with the new adapter
        merge_lora(raw)
    raw.requires_grad_(False)
    for p in lora_parameters(raw):
        p.requires_grad_(True)


def active_adapter(model: nn.Module) -> str | None:
    return lora_state(model).active


def adapter_config(model: nn.Module, name: str | None = None) -> LoRAConfig:
    state = lora_state(model)
    name = name or state.active
    if name not in state.configs:
        raise ConfigError(f"unknown adapter {name!r}; adapters on this model: {list(state.configs)}")
    return state.configs[name]


def lora_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """What to optimize: adapter `name`'s A and B (default: the active one) plus its trainable modules."""
    raw, state = unwrap(model), lora_state(model)
    name = name or state.active
    if name is None:
        return []
    params = [p for _, layer in lora_modules(raw) if name in layer.lora_a
              for p in (layer.lora_a[name].weight, layer.lora_b[name].weight)]
    extra = _trainable_params(raw, adapter_config(raw, name)).values()
    unique = {id(p): p for p in [*params, *extra]}  # tied weights once
    return list(unique.values())


def lora_state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """Adapter `name` as saved: `<path>.lora_a.weight`, `<path>.lora_b.weight` + trainable modules' tensors."""
    raw, state = unwrap(model), lora_state(model)
    cfg = adapter_config(raw, name)
    name = name or state.active
    out: dict[str, torch.Tensor] = {}
    for path, layer in lora_modules(raw):
        if name in layer.lora_a:
            out[f"{path}.lora_a.weight"] = layer.lora_a[name].weight
            out[f"{path}.lora_b.weight"] = layer.lora_b[name].weight
    if name == state.active or name not in state.stash:
        out.update(_trainable_params(raw, cfg))
    else:
        out.update(state.stash[name])
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of Parameters registered under more than one name (tied weights)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, n in seen.items() if n > 1}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the active adapter into the base weights (same outputs; the LoRA path is then skipped)."""
    shared = _shared_weights(unwrap(model))
    for path, layer in lora_modules(model):
        if layer.active is not None and layer.merged is None and id(layer.weight) in shared:
            raise ConfigError(
                f"cannot merge LoRA into {path}: its weight is tied to another module (tie_embeddings), "
                "so merging would change that module too; keep it unmerged or do not target it"
            )
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for _, layer in lora_modules(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapter and put plain nn.Linear layers back: a normal model, every param trainable."""
    raw = unwrap(merge_lora(model))
    for path, layer in list(lora_modules(raw)):
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight, linear.bias = layer.weight, layer.bias
        parent, _, child = path.rpartition(".")
        setattr(raw.get_submodule(parent), child, linear)
    if hasattr(raw, "lora_state"):
        del raw.lora_state
    raw.requires_grad_(True)
    return model


@contextmanager
def adapters_per_row(model: nn.Module, names: list[str | None]) -> Iterator[nn.Module]:
    """Inside the block, batch row i runs adapter names[i] (None = the base alone) in one forward.

    The active adapter is ignored there. Adapters that carry `trainable` modules (a classification head)
    cannot mix in one batch, nor can merged layers: both are ConfigErrors.
    """
    raw = unwrap(model)
    lora_state(model)  # a ConfigError if the model has no adapters
    for name in dict.fromkeys(n for n in names if n is not None):
        cfg = adapter_config(raw, name)
        if cfg.trainable:
            raise ConfigError(f"adapter {name!r} trains whole modules {cfg.trainable}: it cannot share a batch")
    layers = [layer for _, layer in lora_modules(raw)]
    if any(layer.merged is not None for layer in layers):
        raise ConfigError("adapters_per_row needs unmerged LoRA layers (unmerge_lora first)")
    device = raw.tok_embeddings.weight.device if hasattr(raw, "tok_embeddings") else None
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        if name is not None:
            rows.setdefault(name, []).append(i)
    groups = [(n, None if len(r) == len(names) else torch.tensor(r, device=device)) for n, r in rows.items()]
    for layer in layers:
        layer.row_groups = groups
    try:
        yield model
    finally:
        for layer in layers:
            layer.row_groups = None


@contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block (e.g. DPO's reference logits); merged layers are
    unmerged for the block and merged back after. Trainable extra modules stay as they are."""
    layers = [layer for _, layer in lora_modules(model)]
    before = [(layer.disabled, layer.merged is not None) for layer in layers]
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, (disabled, merged) in zip(layers, before):
            layer.disabled = disabled
            if merged:
                layer.merge()


__all__ = [
    "LoRAConfig", "LoRALinear", "LoRAState", "apply_lora", "add_adapter", "set_active_adapter",
    "active_adapter", "adapter_config", "lora_parameters", "lora_state_dict", "lora_modules", "lora_state",
    "merge_lora", "unmerge_lora", "merge_and_unload", "disable_lora", "adapters_per_row", "cast_frozen_weights",
    "lora_update",
]
