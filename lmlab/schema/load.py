"""Typed, strict recipe configs: pydantic models, YAML, dotted `a.b=c` overrides (litgpt `args.py` style).

A recipe YAML mirrors a tree of `Section`s. Loading is strict: an unknown key, a value of the wrong type
or a number outside its range is a ConfigError that names the file and the key, because a typo must never
silently change a run (and `train.grad_accum=0` must never "succeed" by training nothing). Every field
declares its default, its valid range (`Field(ge=1)`, ...) and a docstring in one place; defaults live
nowhere else. `${VAR}` in a string is replaced by the environment variable VAR; `${data_dir}` (and
`${LMLAB_DATA}` when unset) by `lmlab.paths.data_dir()`.

Why pydantic: strict type checks (an int is not a bool, "3" is not an int), range constraints declared
next to each default, `extra="forbid"`, attribute docstrings as field descriptions and nested errors
with their location replace about 150 lines of hand-written coercion, range checks and AST parsing.
What stays here is what a recipe format needs on top: YAML with `1e-3` floats, dotted overrides,
interpolation, one-line errors, the resolved-config file and the resume check.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from lmlab.errors import ConfigError
from lmlab.fileio import atomic_write_text
from lmlab.paths import data_dir


class Section(BaseModel):
    """A group of recipe keys: strict types, ranges, no unknown keys, docstrings as descriptions.

    Built directly (`LoRAConfig(rank=0)`) or from a recipe, a bad value is a ConfigError naming the key.
    Assignment is validated too, so code cannot put a config into a state no recipe could express.
    """

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, use_attribute_docstrings=True,
                              allow_inf_nan=False, protected_namespaces=())

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise ConfigError(describe(err, type(self), type(self).__name__)) from None

    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]  # nested sections validate in pydantic-core,
    # keeping the error's full location (a custom __init__ would be called per nested section)

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as err:
            raise ConfigError(describe(err, type(self), type(self).__name__)) from None


T = TypeVar("T", bound=Section)

# ----------------------------------------------------------------------------------------------------
# YAML, overrides, interpolation


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


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe file as a mapping; a missing file, bad YAML or a non-mapping is a one-line error."""
    try:
        data = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_Loader) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, expected a recipe YAML file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); expected a recipe YAML file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of recipe sections at the top level")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each `a.b=c` (value parsed as YAML) in `data`, in place; returns `data`."""
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected KEY=VALUE (e.g. train.max_steps=100)")
        *parents, last = key.split(".")
        node = data
        for i, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {'.'.join(parents[: i + 1])} is not a group of keys")
        node[last] = parse_scalar(value)
    return data


def load_config(path: str | Path | None, overrides: list[str] = (), *, schema: type[T]) -> T:
    """Read a recipe YAML, apply `a.b=c` overrides, interpolate `${...}`, validate against `schema`."""
    source = str(path) if path else "<defaults>"
    data = apply_overrides(read_recipe(path) if path else {}, list(overrides))
    return validate(schema, interpolate(data, source), source)


def validate(schema: type[T], data: dict[str, Any], source: str) -> T:
    """`schema` built from plain data; the first problem becomes one line naming `source` and the key."""
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe(err, schema, source)) from None


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def interpolate(node: Any, source: str) -> Any:
    """`${VAR}` -> the environment variable; `${data_dir}` -> the shared data folder."""
    if isinstance(node, dict):
        return {k: interpolate(v, source) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, source) for v in node]
    if isinstance(node, str):
        return _VAR.sub(lambda m: _lookup_var(m.group(1), source), node)
    return node


def _lookup_var(name: str, source: str) -> str:
    if name == "data_dir" or (name == "LMLAB_DATA" and name not in os.environ):
        return str(data_dir())
    if name not in os.environ:
        raise ConfigError(f"{source}: ${{{name}}} is not set in the environment")
    return os.environ[name]


# ----------------------------------------------------------------------------------------------------
# one-line errors

_EXPECTED = {
    "int_type": "int", "int_from_float": "int", "float_type": "float", "string_type": "str",
    "bool_type": "bool (true or false)", "list_type": "list", "dict_type": "mapping", "model_type": "a mapping of keys",
    "model_attributes_type": "a mapping of keys", "none_required": "null", "finite_number": "a finite number",
}


def describe(err: ValidationError, schema: type[BaseModel], source: str) -> str:
    """The first validation error as `source: key=value: expected ...` (+ how many more there are)."""
    errors = err.errors(include_url=False)
    e = errors[0]
    key = _dotted(e["loc"])
    kind, ctx, value = e["type"], e.get("ctx") or {}, e.get("input")
    n_more = len({_dotted(x["loc"]) for x in errors}) - 1  # a union reports once per option: count keys
    more = f" (and {n_more} more problem{'s' if n_more > 1 else ''})" if n_more > 0 else ""
    if kind == "extra_forbidden":
        parent = _section_at(schema, e["loc"][:-1])
        known = sorted(parent.model_fields) if parent else []
        where = _dotted(e["loc"][:-1]) or "the recipe"
        return f"{source}: unknown key {key}; known keys of {where}: {known}{more}"
    if kind == "missing":
        return f"{source}: {key} is required{more}"
    if kind == "value_error":
        return f"{source}: {str(ctx.get('error', e['msg']))}{more}"
    bounds = {"greater_than_equal": ">= {ge}", "greater_than": "> {gt}", "less_than_equal": "<= {le}",
              "less_than": "< {lt}", "too_short": "at least {min_length} item(s)", "too_long": "at most {max_length} item(s)",
              "literal_error": "one of {expected}", "string_too_short": "a string of at least {min_length} character(s)"}
    if kind in bounds:
        expected = bounds[kind].format(**ctx)
    else:
        expected = _EXPECTED.get(kind, e["msg"].removeprefix("Input should be "))
        if kind in _EXPECTED and value is not None:
            expected += f", got {type(value).__name__}"
    return f"{source}: {key}={value!r}: expected {expected}{more}"


def _dotted(loc: tuple) -> str:
    """('train', 'betas', 1) -> 'train.betas[1]' (union members like 'int' are dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("int", "float", "str", "none", "bool", "list[float]", "list[str]") or "[" in str(part):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _section_at(schema: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    node: Any = schema
    for part in loc:
        field = getattr(node, "model_fields", {}).get(part) if isinstance(part, str) else None
        if field is None:
            return None
        node = field.annotation
    return node if isinstance(node, type) and issubclass(node, BaseModel) else None


# ----------------------------------------------------------------------------------------------------
# the run folder's config.yaml, and the resume check


def to_dict(cfg: BaseModel) -> dict[str, Any]:
    """The config as plain data, written as a recipe would write it (each section may flatten itself)."""
    return cfg.model_dump(mode="json")


def save_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically), so the run folder says exactly what ran."""
    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


RESUME_SAFE = ("out_dir", "logging.", "checkpoint.", "eval.", "sample.", "export_peft", "train.max_steps",
               "train.epochs", "train.eval_every", "train.threads", "precision.compile", "data.max_eval",
               "data.val_batches", "classify.eval_batch_size", "classify.save_model")
"""Keys a resumed run may change: what it logs, saves and evaluates, and how long it goes on. Anything else
(data, model, batch geometry, optimizer, schedule shape, seeds) would splice two different runs."""


def flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"train": {"seed": 1}} -> {"train.seed": 1}."""
    if not isinstance(node, dict) or not node:
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, child in node.items():
        out.update(flat(child, f"{prefix}.{key}" if prefix else str(key)))
    return out


def changed_keys(run_dir: str | Path, cfg: BaseModel) -> list[str]:
    """Keys outside RESUME_SAFE whose value differs from run_dir/config.yaml ([] when there is none)."""
    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        return []
    try:
        before = flat(yaml.safe_load(saved.read_text()) or {})
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{saved}: unreadable ({' '.join(str(err).split())}); cannot tell whether its "
                          "checkpoints fit this config") from None
    now = flat(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(before.keys() | now.keys())
            if before.get(k) != now.get(k) and not k.startswith(RESUME_SAFE)]


def check_resume_config(run_dir: str | Path, cfg: BaseModel) -> None:
    """Refuse to resume `run_dir`'s checkpoints under a config that differs from the one that wrote them
    (run_dir/config.yaml) in any key outside RESUME_SAFE, naming each changed key."""
    changed = changed_keys(run_dir, cfg)
    if changed:
        raise ConfigError(f"{run_dir}: its checkpoints come from a run with a different config "
                          f"({', '.join(changed[:8])}); resuming would splice two runs. Use another out_dir, "
                          "or the same settings to resume.")


def field_docs(cls: type[BaseModel], prefix: str = "") -> dict[str, str]:
    """Dotted key -> the field's docstring (for `--list-keys` and the config guide), in field order.
    A field a subclass redeclares without a docstring keeps the docstring of the section it extends."""
    docs: dict[str, str] = {}
    for name, info in cls.model_fields.items():
        doc = info.description or next((k.model_fields[name].description for k in cls.__mro__[1:]
                                        if isinstance(k, type) and issubclass(k, BaseModel) and name in
                                        getattr(k, "model_fields", {}) and k.model_fields[name].description), None)
        if doc:
            docs[f"{prefix}{name}"] = " ".join(doc.split())
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            docs.update(field_docs(sub, f"{prefix}{name}."))
    return docs
