"""The recipe sections every recipe kind shares (model, data, train, optim, schedule, precision, checkpoint, logging, sample, distributed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class ModelSection:
    """Which model to build: a preset or a checkpoint, plus ModelConfig field overrides."""

    init: str = "preset:llama2c-stories260k"
    """"preset:NAME" builds a fresh model from lmlab.model.config.PRESETS; a folder path loads its weights."""
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



OptimImpl = Literal["lmlab", "torch", "torch-foreach", "torch-fused"]  # built by lmlab.train.optim.make_adamw



@dataclass
class OptimSection:
    """AdamW settings (see lmlab/train/optim.py)."""

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
    """Learning-rate schedule (see lmlab/train/schedule.py)."""

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
