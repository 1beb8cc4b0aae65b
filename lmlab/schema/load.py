"""Typed, strict run configs: dataclass groups, YAML, dotted `a.b=c` overrides (litgpt `args.py` style).

A recipe YAML mirrors a tree of dataclasses. Loading is strict: an unknown key or a value of the wrong
type is a ConfigError that names the key and the file, because a typo must never silently change a run.
Defaults live only in the dataclasses below. `${VAR}` in a string is replaced by the environment
variable VAR; `${data_dir}` (and `${LMLAB_DATA}` when unset) by `lmlab.paths.data_dir()`.

The schema is generic: `load_config(path, overrides, schema=RunConfig)` accepts any dataclass, so a
later recipe kind adds groups by subclassing `RunConfig` (e.g. a `lora` group) without touching the loop.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from lmlab.errors import ConfigError
from lmlab.fileio import atomic_write_text
from lmlab.model.config import ModelConfig
from lmlab.paths import data_dir
from lmlab.schema.pretrain import RunConfig
from lmlab.schema.sections import ModelSection

# ----------------------------------------------------------------------------------------------------
# loading

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """PyYAML reads `1e-3` as a string (YAML 1.1 wants `1.0e-3`); accept the form everyone writes."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?\.?\d*[eE][-+]?\d+$|^[-+]?\d[\d_]*\.\d*$|^[-+]?\.\d+$"),
    list("-+0123456789."),
)


def parse_scalar(text: str) -> Any:
    """An override value parsed as a YAML scalar: `3` -> int, `1e-3` -> float, `[a, b]` -> list."""
    try:
        return yaml.load(text, Loader=_Loader) if text.strip() else ""
    except yaml.YAMLError:
        return text


def load_config(path: str | Path | None, overrides: list[str] = (), schema: type[T] = RunConfig) -> T:
    """Read a recipe YAML, apply `a.b=c` overrides, interpolate `${...}`, validate against `schema`."""
    source = str(path) if path else "<defaults>"
    data: dict[str, Any] = {}
    if path:
        try:
            data = yaml.load(Path(path).read_text(), Loader=_Loader) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: recipe not found") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE (e.g. train.max_steps=100)")
        _set_dotted(data, key.strip(), parse_scalar(value))
    return from_dict(schema, _interpolate(data, source), source)


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a group")
    node[last] = value


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _interpolate(node: Any, source: str) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(v, source) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, source) for v in node]
    if isinstance(node, str):
        return _VAR.sub(lambda m: _lookup_var(m.group(1), source), node)
    return node


def _lookup_var(name: str, source: str) -> str:
    if name == "data_dir" or (name == "LMLAB_DATA" and name not in os.environ):
        return str(data_dir())
    if name not in os.environ:
        raise ConfigError(f"{source}: ${{{name}}} is not set in the environment")
    return os.environ[name]


def from_dict(cls: type[T], data: dict[str, Any], source: str = "<config>", prefix: str = "") -> T:
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types name the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    if cls is ModelSection:
        data = _split_model_overrides(data, source, prefix)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(
                f"{source}: unknown key {prefix}{key}; known keys of {prefix.rstrip('.') or 'the run'}: "
                f"{sorted(names)}"
            )
        kwargs[key] = _coerce(hints[key], value, source, f"{prefix}{key}")
    return cls(**kwargs)


def _split_model_overrides(data: dict[str, Any], source: str, prefix: str) -> dict[str, Any]:
    """`model: {init: ..., n_layers: 1}`: keys that are ModelConfig fields become overrides."""
    own = {f.name for f in dataclasses.fields(ModelSection)}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    out = {k: v for k, v in data.items() if k in own}
    overrides = dict(out.get("overrides") or {})
    for key, value in data.items():
        if key in own:
            continue
        if key not in model_fields:
            raise ConfigError(
                f"{source}: unknown key {prefix}{key}; expected one of {sorted(own - {'overrides'})} "
                f"or a ModelConfig field {sorted(model_fields)}"
            )
        overrides[key] = value
    hints = typing.get_type_hints(ModelConfig)
    for key, value in overrides.items():
        if key not in model_fields:
            raise ConfigError(f"{source}: unknown key {prefix}overrides.{key}: not a ModelConfig field")
        overrides[key] = _coerce(hints[key], value, source, f"{prefix}{key}")
    out["overrides"] = overrides
    return out


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    """Check `value` against type hint `tp` (int is accepted where float is expected)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, source, f"{key}.")
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(option, value, source, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[-1]
    if tp is type(None):
        if value is None:
            return None
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{source}: {key}={value!r}: expected one of {list(typing.get_args(tp))}")
    elif origin is list:
        if isinstance(value, list):
            (item_tp,) = typing.get_args(tp)
            return [_coerce(item_tp, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif tp is Any:
        return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{source}: {key}={value!r}: expected {_type_name(tp)}, got {type(value).__name__}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data; model overrides are written flat, as a recipe would write them."""
    data = dataclasses.asdict(cfg)

    def flatten(node: Any) -> Any:
        if isinstance(node, dict):
            node = {k: flatten(v) for k, v in node.items()}
            if "init" in node and "overrides" in node:
                node.update(node.pop("overrides"))
        return node

    return flatten(data)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically), so the run folder says exactly what ran."""
    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


RESUME_SAFE = ("out_dir", "logging.", "checkpoint.", "eval.", "sample.", "export_peft", "train.max_steps",
               "train.epochs", "train.eval_every", "train.threads", "precision.compile", "data.max_eval",
               "data.val_batches")
"""Keys a resumed run may change: what it logs, saves and evaluates, and how long it goes on. Anything else
(data, model, batch geometry, optimizer, schedule shape, seeds) would splice two different runs."""


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"train": {"seed": 1}} -> {"train.seed": 1}."""
    if not isinstance(node, dict) or not node:
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, child in node.items():
        out.update(_flat(child, f"{prefix}.{key}" if prefix else str(key)))
    return out


def check_resume_config(run_dir: str | Path, cfg: Any) -> None:
    """Refuse to resume `run_dir`'s checkpoints under a config that differs from the one that wrote them
    (run_dir/config.yaml) in any key outside RESUME_SAFE, naming each changed key."""
    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        return
    try:
        before = _flat(yaml.safe_load(saved.read_text()) or {})
    except yaml.YAMLError as err:
        raise ConfigError(f"{saved}: unreadable ({err}); cannot tell whether its checkpoints fit this config") from None
    now = _flat(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    changed = [k for k in sorted(before.keys() | now.keys())
               if before.get(k) != now.get(k) and not k.startswith(RESUME_SAFE)]
    if changed:
        diffs = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:8])
        raise ConfigError(f"{run_dir}: its checkpoints come from a run with a different config ({diffs}); resuming "
                          "would splice two runs. Use another out_dir, or the same settings to resume.")


def field_docs(cls: type = RunConfig, prefix: str = "") -> dict[str, str]:
    """Dotted key -> the field's docstring (for `lmlab run --help-config` and the config guide)."""
    import ast
    import inspect

    own: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a section subclassing a shared one inherits its docs
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(inspect.getsource(klass)).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                own[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[union-attr]
    docs: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):  # in field order
        if f.name in own:
            docs[f"{prefix}{f.name}"] = own[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            docs.update(field_docs(hints[f.name], f"{prefix}{f.name}."))
    return docs
