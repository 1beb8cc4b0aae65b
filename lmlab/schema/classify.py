"""The classification recipe (`lmlab classify`): zero-shot prompting, full and LoRA fine-tuning with a head.

Defaults follow the minllama assignment (epochs 5, lr 2e-5, dropout 0.3, last-token pooling, AdamW
without weight decay, linear schedule with 10% warmup, a step of 80 examples) except LoRA, whose seed
settings (r 4, alpha 1, lr 2e-5) barely move the model: see `ClassifyLoRA` and the classification recipes.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from lmlab.schema.load import Section
from lmlab.schema.sections import (
    CheckpointSection,
    FinetuneModelSection,
    LoRAConfig,
    OptimSection,
    Probability,
    RecipeConfig,
    ScheduleSection,
    TrainSection,
)

SEED_PROMPT = "{text} Is this movie {labels}? This movie is"


class ClassifyDataSection(Section):
    """The splits, their format and how texts become tokens."""

    train: str = ""
    """Training file (`LABEL ||| text`, .csv/.tsv with header, or .jsonl). Zero-shot does not need it."""
    dev: str = ""
    """Development split: metrics, and the state kept when checkpoint.best is on."""
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
    max_len: int = Field(256, ge=2)
    """Tokens per example including the template; longer texts are truncated and counted."""
    truncation: Literal["head", "tail", "middle"] = "middle"
    """Which tokens of a long text to keep: start, end, or first quarter + last three quarters."""
    max_train: int = Field(0, ge=0)
    """Use a random N of the training examples (fixed seed 0, file order kept; 0 = all): quick runs."""
    max_eval: int = Field(0, ge=0)
    """Use a random N of the dev/test examples (fixed seed 0, file order kept; 0 = all)."""


class ClassifySection(Section):
    """Which method, and how inputs and outputs are shaped."""

    method: Literal["zeroshot", "finetune", "lora"] = "finetune"
    """zeroshot: label log-probabilities after a prompt; finetune: all weights + head; lora: adapters + head."""
    pooling: Literal["last", "mean"] = "last"
    """Head input: the last non-padding token's hidden state (seed), or the mean over real tokens."""
    dropout: Probability = 0.3
    """Dropout before the head (seed: hidden_dropout_prob 0.3)."""
    head_lr_mult: float = Field(1.0, gt=0.0)
    """Head learning rate = optim.lr times this (a fresh head learns slowly at fine-tuning rates)."""
    template: str = "{text}"
    """Fine-tuning input template; must contain {text}; {labels} becomes "a, b, or c". The seed feeds the bare
    text; ending on a question about the label (as the zero-shot prompt does) makes the last hidden state,
    where the head reads, already hold the model's answer: the SmolLM2 recipes do that."""
    prompt: str = SEED_PROMPT
    """Zero-shot prompt; {text} is the example, {labels} the names joined as "a, b, or c" (seed prompt)."""
    verbalizers: list[str] = Field(default_factory=list)
    """Zero-shot continuation per label (same order as the names); empty = " name" (or "name" with chat)."""
    score: Literal["sum", "mean"] = "sum"
    """Zero-shot score: sum of verbalizer token log-probs = log P(verbalizer | prompt); mean = per token."""
    chat: bool = False
    """Wrap the prompt/template as a user turn of the tokenizer's chat template (instruct models)."""
    system: str = ""
    """System message when chat is on (empty = none)."""
    eval_batch_size: int = Field(32, ge=1)
    """Examples per inference batch."""
    save_model: bool = True
    """Save the adapter + head (lora) or the weights + head (finetune) in the run folder."""


class ClassifyLoRA(LoRAConfig):
    """LoRA adapters for method=lora; the head is always trainable and saved with them.

    The seed's r=4, alpha=1 scales the update by alpha/r = 0.25 and, at lr 2e-5, hardly moves the
    adapters in 5 epochs (its LoRA dev accuracies sit near chance). A scale of 2 (r 16, alpha 32), a
    LoRA-sized learning rate (5e-4) and all attention + MLP projections close most of the gap to full
    fine-tuning at ~3% of the trainable parameters.
    """

    rank: int = Field(16, ge=1)
    """Rank r of each adapter."""
    alpha: float = Field(32.0, gt=0.0)
    """Update scale numerator: alpha / r."""
    dropout: Probability = 0.05
    """Dropout on the LoRA path."""
    target_modules: Annotated[list[str], Field(min_length=1)] = \
        Field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    """Linear layers to adapt (attention wq wk wv wo; MLP w1 w2 w3)."""


class ClassifyTrainSection(TrainSection):
    """Epochs and batches (the seed: 5 epochs of 80 examples per step)."""

    max_steps: int = Field(0, ge=0)
    """Optimizer steps; 0 = derive from epochs."""
    epochs: float = Field(5.0, ge=0.0)
    """Passes over the training split (seed: 5)."""
    batch_size: int = Field(80, ge=1)
    """Examples per micro-batch (seed: 80 per step for SST, 10 for CFIMDB; with grad_accum > 1 a step
    holds batch_size x grad_accum examples)."""
    eval_every: int = Field(0, ge=0)
    """Dev accuracy every N steps (and at the end); 0 = at the end of each epoch (the seed's cadence)."""


class ClassifySchedule(ScheduleSection):
    """The seed's schedule: linear decay after a 10% warmup."""

    kind: Literal["cosine", "linear", "constant"] = "linear"
    """Shape after warmup."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup steps when warmup_fraction is 0."""
    warmup_fraction: Probability = 0.1
    """Share of all steps spent warming up linearly."""


class ClassifyOptimSection(OptimSection):
    """AdamW (lmlab/train/optim.py) with the seed's defaults."""

    lr: float = Field(2e-5, gt=0.0)
    """Peak learning rate (seed: 2e-5)."""
    betas: Annotated[list[Probability], Field(min_length=2, max_length=2)] = Field(default_factory=lambda: [0.9, 0.999])
    """Adam beta1, beta2."""
    eps: float = Field(1e-6, gt=0.0)
    """Adam epsilon."""
    weight_decay: float = Field(0.0, ge=0.0)
    """Decoupled weight decay on matrices."""


class ClassifyCheckpoints(CheckpointSection):
    """The best dev-accuracy state is kept and the run ends on it (the seed keeps its best epoch; dev numbers
    are then optimistic); step checkpoints every N steps make a killed run resume exactly."""

    best: bool = True
    """Keep checkpoints/best at the best dev accuracy and predict with it at the end."""


class ClassifyConfig(RecipeConfig):
    """A classification run (`lmlab classify`)."""

    out_dir: str = Field("runs/classify", min_length=1)
    """Run folder (one seed_N/ subfolder per seed with --seeds)."""
    model: FinetuneModelSection = Field(default_factory=FinetuneModelSection)
    """Backbone."""
    data: ClassifyDataSection = Field(default_factory=ClassifyDataSection)
    """Splits and tokenization."""
    classify: ClassifySection = Field(default_factory=ClassifySection)
    """Method, head, prompt."""
    lora: ClassifyLoRA = Field(default_factory=ClassifyLoRA)
    """Adapters (method=lora)."""
    train: ClassifyTrainSection = Field(default_factory=ClassifyTrainSection)
    """Loop length and batches."""
    optim: ClassifyOptimSection = Field(default_factory=ClassifyOptimSection)
    """Optimizer."""
    schedule: ClassifySchedule = Field(default_factory=ClassifySchedule)
    """Learning-rate schedule."""
    checkpoint: ClassifyCheckpoints = Field(default_factory=ClassifyCheckpoints)
    """Best dev state, step checkpoints and resume."""
