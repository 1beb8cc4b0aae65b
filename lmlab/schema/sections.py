"""The recipe sections every recipe kind shares, each defined once: model, train, optim, schedule,
precision, checkpoint, logging, lora, sampling (and distributed), plus `RecipeConfig`, the base of every
recipe kind (pretraining, SFT, classification, DPO, ...). A recipe kind extends a section by subclassing it
and restating the defaults that differ (with their docstrings); the ranges stay where they were declared.
Data sections differ by kind (a corpus, instruction records, labelled texts, preference pairs) and live
with their recipe kind.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError, model_serializer, model_validator

from lmlab.errors import ConfigError
from lmlab.model.config import ModelConfig, check_range
from lmlab.schema.load import Section, validate

Probability = Annotated[float, Field(ge=0.0, lt=1.0)]
"""A share or a drop rate: 0 <= p < 1."""


class ModelSection(Section):
    """Which model: any `lmlab.weights.loading.load_model` spec, plus ModelConfig field overrides."""

    spec: str = "smollm2-135m-instruct"
    """Registered name, preset:NAME (random init), .gguf / llama2.c .bin / .pt file, lmlab or HF folder, hub name."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """ModelConfig fields to change (written flat in YAML: `model: {n_layers: 1}` or `model.n_layers=1`)."""

    @model_validator(mode="before")
    @classmethod
    def _flat_overrides(cls, data: Any) -> Any:
        """`model: {spec: ..., n_layers: 1}`: keys that are ModelConfig fields become overrides, type-checked."""
        if not isinstance(data, dict):
            return data
        own = set(cls.model_fields)
        out = {k: v for k, v in data.items() if k in own}
        given = out.get("overrides")
        if "overrides" in out and not isinstance(given, dict):  # never silently dropped (nor null taken as {})
            raise ValueError(f"model.overrides={given!r}: expected a mapping of ModelConfig fields, got "
                             f"{type(given).__name__}")
        overrides = dict(given) if isinstance(given, dict) else {}
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
        for key, value in data.items():
            if key in own:
                continue
            if key not in model_fields:
                raise ValueError(f"unknown key model.{key}; expected one of {sorted(own - {'overrides'})} or a "
                                 f"ModelConfig field {sorted(model_fields)}")
            if key in overrides and overrides[key] != value:  # which one was meant cannot be told: say so
                raise ValueError(f"model.{key} is set twice (model.{key}={value!r} and model.overrides.{key}="
                                 f"{overrides[key]!r}); set it once")
            overrides[key] = value
        for key, value in overrides.items():
            if key not in model_fields:
                raise ValueError(f"unknown key model.overrides.{key}: not a ModelConfig field {sorted(model_fields)}")
            try:
                TypeAdapter(_MODEL_HINTS[key]).validate_python(value, strict=True)
            except ValidationError:
                hint = str(_MODEL_HINTS[key]).replace("typing.", "").replace("<class '", "").replace("'>", "")
                raise ValueError(f"model.{key}={value!r}: expected {hint}, got {type(value).__name__}") from None
            check_range(key, value)
        if "overrides" in out or overrides:
            out["overrides"] = overrides
        return out

    @model_serializer(mode="wrap")
    def _write_flat(self, handler: Any) -> dict[str, Any]:
        """Written back as a recipe writes it: overrides flat beside `spec`."""
        data = handler(self)
        data.update(data.pop("overrides", {}))
        return data


_MODEL_HINTS = typing.get_type_hints(ModelConfig)


class FinetuneModelSection(ModelSection):
    """The model to tune: anything `load_model` takes, and a tokenizer where the model carries none."""

    tokenizer: str = ""
    """Tokenizer path when the model does not carry one (e.g. a llama2.c .pt); empty = the model's."""


class TrainSection(Section):
    """Loop length, batch geometry and evaluation cadence."""

    max_steps: int = Field(1000, ge=0)
    """Optimizer steps (0 = derive from `epochs`)."""
    epochs: float = Field(0.0, ge=0.0)
    """Passes over the training split (used when max_steps is 0)."""
    batch_size: int = Field(8, ge=1)
    """Sequences (examples) per micro-batch per process."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step; the loss is weighted per counted token (or example) across them."""
    grad_clip: float = Field(1.0, ge=0.0)
    """Max global gradient L2 norm; 0 = no clipping."""
    eval_every: int = Field(250, ge=0)
    """Validation every N steps (and at the end); 0 = at the end of each epoch when the run is sized by
    epochs, else only at the end."""
    seed: int = Field(1337, ge=0)
    """Seeds weights, dropout and batch order."""
    threads: int = Field(0, ge=0)
    """torch CPU threads; 0 = torch's default."""
    skip_nonfinite: int = Field(0, ge=0)
    """Skip up to this many steps whose loss or gradient norm is NaN/inf (the update is not applied);
    0 = stop at the first one. Either way no non-finite value reaches the weights."""


OptimImpl = Literal["lmlab", "torch", "torch-foreach", "torch-fused"]
"""lmlab's own AdamW or torch.optim.AdamW (default, foreach or fused kernel); built by lmlab.train.optim."""


class OptimSection(Section):
    """AdamW settings (see lmlab/train/optim.py)."""

    impl: OptimImpl = "lmlab"
    """lmlab's own AdamW or torch.optim.AdamW (default, foreach or fused kernel)."""
    lr: float = Field(1e-3, gt=0.0)
    """Peak learning rate."""
    betas: Annotated[list[Probability], Field(min_length=2, max_length=2)] = Field(default_factory=lambda: [0.9, 0.95])
    """Adam beta1, beta2 (two values in [0, 1))."""
    eps: float = Field(1e-8, gt=0.0)
    """Adam epsilon."""
    weight_decay: float = Field(0.1, ge=0.0)
    """Decoupled weight decay on matrices (never on norms and biases)."""
    decay_embeddings: bool = False
    """Also decay embedding tables."""


class ScheduleSection(Section):
    """Learning-rate schedule (see lmlab/train/schedule.py)."""

    kind: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape after warmup."""
    warmup_steps: int = Field(100, ge=0)
    """Linear warmup from 0 to lr."""
    warmup_fraction: Probability = 0.0
    """Warmup as a share of all steps; when > 0 it replaces warmup_steps (the seeds' warmup ratio)."""
    decay_steps: int = Field(0, ge=0)
    """Step at which the decay reaches min_lr; 0 = max_steps."""
    min_lr: float = Field(0.0, ge=0.0)
    """Floor of the schedule."""

    def warmup(self, max_steps: int) -> int:
        """Warmup steps of a run of `max_steps` steps."""
        return round(self.warmup_fraction * max_steps) if self.warmup_fraction else self.warmup_steps


class PrecisionSection(Section):
    """Device and numeric format (see lmlab/precision.py)."""

    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    """Autocast dtype; auto = bf16 where the hardware has native bf16 matmuls (CUDA, AVX512-BF16 / AMX CPUs),
    else fp32; fp16 (CUDA only) adds a gradient scaler. Weights stay fp32."""
    compile: bool = False
    """torch.compile the model."""


class CheckpointSection(Section):
    """When to save and whether to resume."""

    every: int = Field(0, ge=0)
    """Save every N steps; 0 = only the final and best checkpoints."""
    best: bool = True
    """Keep checkpoints/best at the best validation score (lowest loss, or the recipe's selection metric)."""
    keep_last: int = Field(0, ge=0)
    """Keep only the newest N step checkpoints; 0 = keep all."""
    resume: bool = True
    """Continue from the newest checkpoint in out_dir when there is one; false = refuse a folder that has one."""


class LoggingSection(Section):
    """What the run reports while it trains."""

    log_every: int = Field(10, ge=1)
    """metrics.jsonl line every N steps."""
    progress: bool = True
    """tqdm progress bar (loss, tokens/s, ETA)."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to out_dir/tb (needs the tensorboard package)."""
    peak_tflops: float = Field(0.0, ge=0.0)
    """Hardware peak for MFU; 0 = a quick matmul measurement on CPU, a table lookup on CUDA."""


class LoRAConfig(Section):
    """One adapter's shape and where it goes (see lmlab/adapters/lora.py); saved in adapter_config.json."""

    rank: int = Field(8, ge=1)
    """r, the rank of B A. Higher = more capacity and more parameters (r * (in + out) per layer)."""
    alpha: float = Field(16.0, gt=0.0)
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: Probability = 0.0
    """Dropout on the LoRA path's input only (the base path never sees it)."""
    target_modules: Annotated[list[str], Field(min_length=1)] = Field(default_factory=lambda: ["wq", "wv"])
    """nn.Linear names to adapt: a leaf name ("wq", "w1", "output") or a dotted suffix/full path
    ("layers.0.attention.wq"). Attention: wq wk wv wo; MLP: w1 w2 w3; head: output."""
    trainable: list[str] = Field(default_factory=list)
    """Extra modules (any type, same matching) that stay trainable and are saved with the adapter,
    e.g. a classification head "head"."""
    use_rslora: bool = False
    """Rank-stabilized scaling alpha / sqrt(r), so higher ranks keep learning (Kalajdzievski 2023)."""

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "lora config") -> LoRAConfig:
        """Build from a dict (an adapter_config.json), rejecting unknown keys by name."""
        unknown = sorted(set(data) - set(cls.model_fields))
        if unknown:
            raise ConfigError(f"{source}: unknown LoRA config key(s) {unknown}; known keys: {sorted(cls.model_fields)}")
        return validate(cls, data, source)


class SamplingConfig(Section):
    """How the next token is chosen (see lmlab/generation/sampling.py)."""

    temperature: float = Field(1.0, ge=0.0)
    """0 = greedy (argmax); < 1 sharper, > 1 flatter."""
    top_k: int | None = Field(None, ge=1)
    """Keep only the k most likely tokens (null = all)."""
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    """Keep the smallest set of tokens whose probability mass reaches p (nucleus)."""
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    """Drop tokens whose probability is below min_p times the top token's probability."""
    epsilon: Probability | None = None
    """Drop tokens whose probability is below epsilon (the top token always survives)."""
    repetition_penalty: float = Field(1.0, gt=0.0)
    """> 1 discourages tokens already in the sequence (CTRL: logits / p if > 0 else * p)."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def sampling(self) -> SamplingConfig:
        """Just the sampling knobs (a section that extends this one carries more)."""
        return SamplingConfig(**{k: getattr(self, k) for k in SamplingConfig.model_fields})


class DistributedSection(Section):
    """Multi-process training under torchrun (ignored in a single process)."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    """DistributedDataParallel, or FSDP (fully_shard) for models that do not fit one device."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """auto = nccl on CUDA, gloo on CPU."""


class RecipeConfig(Section):
    """What every training recipe has; the training session (lmlab/train/session.py) reads these."""

    out_dir: str = Field("runs/run", min_length=1)
    """Run folder: config.yaml, metrics.jsonl, summary.json, checkpoints/."""
    model: ModelSection = Field(default_factory=ModelSection)
    """What to build or load."""
    train: TrainSection = Field(default_factory=TrainSection)
    """Loop length and batch geometry."""
    optim: OptimSection = Field(default_factory=OptimSection)
    """Optimizer."""
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    """Learning-rate schedule."""
    precision: PrecisionSection = Field(default_factory=PrecisionSection)
    """Device and dtype."""
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    """Saving and resuming."""
    logging: LoggingSection = Field(default_factory=LoggingSection)
    """Metrics, progress bar, TensorBoard."""
