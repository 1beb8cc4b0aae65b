"""The classification recipe schema (`lmlab classify RECIPE.yaml`): typed, strict dataclass groups read
by `lmlab.schema.load.load_config(path, overrides, schema=ClassifyConfig)`.

Defaults follow the minllama assignment (epochs 5, lr 2e-5, dropout 0.3, last-token pooling, AdamW
without weight decay) except LoRA, whose seed settings (r 4, alpha 1, lr 2e-5) barely move the model:
see docs in the `LoraSection` fields and the classification recipes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lmlab.schema import sections
from lmlab.schema.sections import LoggingSection, PrecisionSection

SEED_PROMPT = "{text} Is this movie {labels}? This movie is"


@dataclass
class ModelSection:
    """The backbone: anything `lmlab.weights.loading.load_model` takes."""

    spec: str = "smollm2-135m-instruct"
    """Registered name, .gguf / llama2.c .bin / .pt file (stories42M.pt), lmlab run or HF folder."""
    tokenizer: str = ""
    """Tokenizer path when the model does not carry one (e.g. a llama2.c .pt); empty = the model's."""


@dataclass
class DataSection:
    """The splits, their format and how texts become tokens."""

    train: str = ""
    """Training file (`LABEL ||| text`, .csv/.tsv with header, or .jsonl). Zero-shot does not need it."""
    dev: str = ""
    """Development split: metrics, and the epoch kept when classify.select_best is on."""
    test: str = ""
    """Test split (optional): predictions, and metrics when data.test_has_labels."""
    label_names: str = ""
    """JSON list of label names (index = label id), e.g. ${data_dir}/sst5/sst-label-mapping.json."""
    format: Literal["auto", "pipe", "table"] = "auto"
    """pipe = `LABEL ||| text`; table = CSV/TSV/JSONL with text_field/label_field; auto = by suffix."""
    text_field: str = "text"
    """Column / JSON key with the text (table format)."""
    label_field: str = "label"
    """Column / JSON key with the label: an id or a label name (table format)."""
    sst2: bool = False
    """Derive SST-2 from SST-5 files: drop neutral (2), merge 0,1 -> negative and 3,4 -> positive."""
    test_has_labels: bool = True
    """False when the test labels are placeholders (CFIMDB): predictions only, no test metrics."""
    max_len: int = 256
    """Tokens per example including the template; longer texts are truncated and counted."""
    truncation: Literal["head", "tail", "middle"] = "middle"
    """Which tokens of a long text to keep: start, end, or first quarter + last three quarters."""
    max_train: int = 0
    """Use a random N of the training examples (fixed seed 0, file order kept; 0 = all): quick runs."""
    max_eval: int = 0
    """Use a random N of the dev/test examples (fixed seed 0, file order kept; 0 = all)."""


@dataclass
class ClassifySection:
    """Which method, and how inputs and outputs are shaped."""

    method: Literal["zeroshot", "finetune", "lora"] = "finetune"
    """zeroshot: label log-probabilities after a prompt; finetune: all weights + head; lora: adapters + head."""
    pooling: Literal["last", "mean"] = "last"
    """Head input: the last non-padding token's hidden state (seed), or the mean over real tokens."""
    dropout: float = 0.3
    """Dropout before the head (seed: hidden_dropout_prob 0.3)."""
    head_lr_mult: float = 1.0
    """Head learning rate = optim.lr times this (a fresh head learns slowly at fine-tuning rates)."""
    template: str = "{text}"
    """Fine-tuning input template; must contain {text}; {labels} becomes "a, b, or c". The seed feeds the bare
    text; ending on a question about the label (as the zero-shot prompt does) makes the last hidden state,
    where the head reads, already hold the model's answer: the SmolLM2 recipes do that."""
    prompt: str = SEED_PROMPT
    """Zero-shot prompt; {text} is the example, {labels} the names joined as "a, b, or c" (seed prompt)."""
    verbalizers: list[str] = field(default_factory=list)
    """Zero-shot continuation per label (same order as the names); empty = " name" (or "name" with chat)."""
    score: Literal["sum", "mean"] = "sum"
    """Zero-shot score: sum of verbalizer token log-probs = log P(verbalizer | prompt); mean = per token."""
    chat: bool = False
    """Wrap the prompt/template as a user turn of the tokenizer's chat template (instruct models)."""
    system: str = ""
    """System message when chat is on (empty = none)."""
    eval_batch_size: int = 32
    """Examples per inference batch."""
    select_best: bool = True
    """Keep the epoch with the best dev accuracy, as the seed does (dev numbers are then optimistic)."""
    save_model: bool = True
    """Save the adapter + head (lora) or the weights + head (finetune) in the run folder."""


@dataclass
class LoraSection:
    """LoRA adapters for method=lora (see lmlab/adapters/lora.py); the head is always trainable and saved with them.

    The seed's r=4, alpha=1 scales the update by alpha/r = 0.25 and, at lr 2e-5, hardly moves the
    adapters in 5 epochs (its LoRA dev accuracies sit near chance). A scale of 2 (r 16, alpha 32), a
    LoRA-sized learning rate (5e-4) and all attention + MLP projections close most of the gap to full
    fine-tuning at ~3% of the trainable parameters.
    """

    rank: int = 16
    """Rank r of each adapter."""
    alpha: float = 32.0
    """Update scale numerator: alpha / r."""
    dropout: float = 0.05
    """Dropout on the LoRA path."""
    target_modules: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    """Linear layers to adapt (attention wq wk wv wo; MLP w1 w2 w3)."""
    use_rslora: bool = False
    """alpha / sqrt(r) scaling."""


@dataclass
class TrainSection:
    """Epochs, batches, schedule shape."""

    epochs: float = 5.0
    """Passes over the training split (seed: 5)."""
    batch_size: int = 80
    """Examples per optimizer step (seed: 80 for SST, 10 for CFIMDB)."""
    grad_accum: int = 1
    """Micro-batches per step (memory); the loss is weighted per example across them."""
    grad_clip: float = 1.0
    """Max gradient norm; 0 = none."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Learning rate after warmup."""
    warmup_fraction: float = 0.1
    """Share of all steps spent warming up linearly."""
    seed: int = 1337
    """Seeds the head, dropout, LoRA init and batch order (seed's default 1337)."""
    threads: int = 0
    """torch CPU threads; 0 = torch's default."""


@dataclass
class OptimSection(sections.OptimSection):
    """AdamW (lmlab/train/optim.py) with the seed's defaults; the fields are the pretraining recipe's."""

    lr: float = 2e-5
    """Peak learning rate (seed: 2e-5)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam beta1, beta2."""
    eps: float = 1e-6
    """Adam epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay on matrices."""


@dataclass
class ClassifyConfig:
    """A classification run (`lmlab classify`)."""

    out_dir: str = "runs/classify"
    """Run folder (one seed_N/ subfolder per seed with --seeds)."""
    model: ModelSection = field(default_factory=ModelSection)
    """Backbone."""
    data: DataSection = field(default_factory=DataSection)
    """Splits and tokenization."""
    classify: ClassifySection = field(default_factory=ClassifySection)
    """Method, head, prompt."""
    lora: LoraSection = field(default_factory=LoraSection)
    """Adapters (method=lora)."""
    train: TrainSection = field(default_factory=TrainSection)
    """Loop length and batches."""
    optim: OptimSection = field(default_factory=OptimSection)
    """Optimizer."""
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    """Device and autocast dtype (bf16 is ~2x faster on this kind of CPU)."""
    logging: LoggingSection = field(default_factory=LoggingSection)
    """metrics.jsonl cadence and progress bar."""


__all__ = ["ClassifyConfig", "ModelSection", "DataSection", "ClassifySection", "LoraSection", "TrainSection",
           "OptimSection", "SEED_PROMPT"]
