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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from lmlab.errors import ConfigError


@dataclass
class ModelSection:
    """Which model to build: a preset or a checkpoint, plus ModelConfig field overrides."""

    init: str = "preset:llama2c-stories260k"
    """"preset:NAME" builds a fresh model from lmlab.config.PRESETS; a folder path loads its weights."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields to change (written flat in YAML: `model: {n_layers: 1}` or `model.n_layers=1`)."""
    vocab_from_tokenizer: bool = True
    """For a fresh preset: set vocab_size to the tokenizer's (unless overridden)."""


@dataclass
class DataSection:
    """Where the tokens come from and how batches are cut (see lmlab/data/pretrain.py)."""

    path: str = ""
    """Corpus: a text file, .jsonl/.json (see `field`), .csv (see `column`), or `hf:NAME` (online only)."""
    field: str = "text"
    """JSONL/JSON record field holding the text."""
    column: str = "text"
    """CSV column holding the text."""
    hf_split: str = "train"
    """Split of a Hugging Face dataset."""
    val_path: str = ""
    """Optional separate validation corpus; else the last `val_fraction` of `path` is held out."""
    val_fraction: float = 0.1
    """Share of the corpus (tokens, or documents in chunk mode) held out for validation."""
    tokenizer: str = "char"
    """`char` (built from the corpus) or a path lmlab.tokenizer.load_tokenizer reads."""
    seq_len: int = 0
    """Training context; 0 = the model's max_seq_len."""
    sampling: Literal["random", "chunks"] = "random"
    """random: windows at random offsets (nanoGPT); chunks: consecutive per-document chunks, padded."""
    doc_separator: Literal["line", "blank_line", "record", "none"] = "record"
    """How a text file splits into documents (record = one per JSONL/CSV row, whole file for text)."""
    add_bos: bool = False
    """Prepend the tokenizer's BOS id to each document."""
    add_eos: bool = False
    """Append the tokenizer's EOS id to each document."""
    cache_dir: str = ""
    """Token shard cache; empty = ~/.cache/lmlab/tokens (or $LMLAB_CACHE)."""
    val_batches: int = 0
    """Validation batches per evaluation; 0 = the whole validation split."""


@dataclass
class TrainSection:
    """Loop length, batch geometry and evaluation cadence."""

    max_steps: int = 1000
    """Optimizer steps (0 = derive from `epochs`)."""
    epochs: float = 0.0
    """Passes over the training split (used when max_steps is 0)."""
    batch_size: int = 8
    """Sequences per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (token-weighted)."""
    grad_clip: float = 1.0
    """Max global gradient L2 norm; 0 = no clipping."""
    eval_every: int = 250
    """Validation loss every N steps (and at the end); 0 = only at the end."""
    seed: int = 1337
    """Seeds weights, dropout and batch order."""
    threads: int = 0
    """torch CPU threads; 0 = torch's default."""


OptimImpl = Literal["lmlab", "torch", "torch-foreach", "torch-fused"]  # built by lmlab.optim.make_adamw


@dataclass
class OptimSection:
    """AdamW settings (see lmlab/optim.py)."""

    impl: OptimImpl = "lmlab"
    """lmlab's own AdamW or torch.optim.AdamW (default, foreach or fused kernel)."""
    lr: float = 1e-3
    """Peak learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam beta1, beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (never on norms and biases)."""
    decay_embeddings: bool = False
    """Also decay embedding tables."""


@dataclass
class ScheduleSection:
    """Learning-rate schedule (see lmlab/schedule.py)."""

    kind: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape after warmup."""
    warmup_steps: int = 100
    """Linear warmup from 0 to lr."""
    decay_steps: int = 0
    """Step at which the decay reaches min_lr; 0 = max_steps."""
    min_lr: float = 0.0
    """Floor of the schedule."""


@dataclass
class PrecisionSection:
    """Device and numeric format (see lmlab/precision.py)."""

    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast dtype; fp16 (CUDA only) adds a gradient scaler. Weights stay fp32."""
    compile: bool = False
    """torch.compile the model."""


@dataclass
class CheckpointSection:
    """When to save and whether to resume."""

    every: int = 0
    """Save every N steps; 0 = only the final and best checkpoints."""
    best: bool = True
    """Keep checkpoints/best at the lowest validation loss."""
    keep_last: int = 0
    """Keep only the newest N step checkpoints; 0 = keep all."""
    resume: bool = True
    """Continue from the newest checkpoint in out_dir when there is one."""


@dataclass
class LoggingSection:
    """What the run reports while it trains."""

    log_every: int = 10
    """metrics.jsonl line every N steps."""
    progress: bool = True
    """tqdm progress bar (loss, tokens/s, ETA)."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to out_dir/tb (needs the tensorboard package)."""
    peak_tflops: float = 0.0
    """Hardware peak for MFU; 0 = a quick matmul measurement on CPU, a table lookup on CUDA."""


@dataclass
class SampleSection:
    """Optional text samples written to samples.txt after training."""

    prompts: list[str] = field(default_factory=list)
    """Prompts to continue; empty = no samples."""
    max_new_tokens: int = 100
    """Tokens to generate per prompt."""
    temperature: float = 0.8
    """Sampling temperature (0 = greedy)."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 = all."""


@dataclass
class DistributedSection:
    """Multi-process training under torchrun (ignored in a single process)."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    """DistributedDataParallel, or FSDP (fully_shard) for models that do not fit one device."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """auto = nccl on CUDA, gloo on CPU."""


@dataclass
class RunConfig:
    """A pretraining run (`lmlab run`)."""

    out_dir: str = "runs/run"
    """Run folder: config.yaml, metrics.jsonl, summary.json, checkpoints/."""
    model: ModelSection = field(default_factory=ModelSection)
    """What to build or load."""
    data: DataSection = field(default_factory=DataSection)
    """Corpus, tokenizer and batching."""
    train: TrainSection = field(default_factory=TrainSection)
    """Loop length and batch geometry."""
    optim: OptimSection = field(default_factory=OptimSection)
    """Optimizer."""
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    """Learning-rate schedule."""
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    """Device and dtype."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Saving and resuming."""
    logging: LoggingSection = field(default_factory=LoggingSection)
    """Metrics, progress bar, TensorBoard."""
    sample: SampleSection = field(default_factory=SampleSection)
    """Samples after training."""
    distributed: DistributedSection = field(default_factory=DistributedSection)
    """torchrun settings."""


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
        from lmlab.paths import data_dir

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
    from lmlab.config import ModelConfig

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
    from lmlab.fileio import atomic_write_text

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
