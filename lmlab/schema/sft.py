"""The instruction-tuning recipe (`lmlab sft`): LoRA SFT, QA, summarization and math adapters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lmlab.adapters.lora import LoRAConfig
from lmlab.data.instruct import ALPACA_MARKER
from lmlab.schema.classify import ModelSection
from lmlab.schema.sections import (
    CheckpointSection,
    LoggingSection,
    OptimImpl,
    OptimSection,
    PrecisionSection,
    ScheduleSection,
    TrainSection,
)

NOVEL_INSTRUCTIONS = [  # seed 000's out-of-distribution checks
    "Write a haiku about autumn leaves.",
    "Tell me a riddle and then give its answer.",
    "Write a short travel guide for a first-time visitor to Tokyo.",
    "Is 97 a prime number? Explain your reasoning.",
    "Translate into French: 'Where is the nearest train station?'",
]



@dataclass
class InstructDataSection:
    """Where the records come from, how they are split and templated."""

    source: Literal["alpaca", "mcq", "saq", "dialogsum", "gsm8k", "sst2"] = "alpaca"
    """Reader: alpaca JSON/JSONL; mcq (MMLU csv folder / ARC jsonl); saq (NQ-open jsonl); dialogsum; gsm8k;
    sst2 (an SST-5 `LABEL ||| text` file, neutral dropped)."""
    paths: list[str] = field(default_factory=list)
    """Data files (records of all are pooled before the split)."""
    test_paths: list[str] = field(default_factory=list)
    """Separate test files (e.g. GSM8K test.jsonl); when set they replace the split's test part."""
    split: list[int] = field(default_factory=lambda: [5, 1, 1])
    """train : validation : test ratios (seed 000: 10k/2k/2k of a seeded subset)."""
    split_seed: int = 42
    """Seed of the shuffle before the split."""
    subset: int = 0
    """Keep this many shuffled records before splitting (0 = all)."""
    max_train: int = 0
    """Cap on training examples after the split (0 = all): CPU-sized runs."""
    max_eval: int = 0
    """Cap on validation and test examples (0 = all)."""
    template: Literal["alpaca", "chat", "custom"] = "alpaca"
    """Prompt format: Stanford Alpaca's, the model's chat template, or custom_template."""
    custom_template: str = ""
    """With template=custom: text with {instruction}, optional {input}, ending with response_marker."""
    response_marker: str = ALPACA_MARKER
    """Text after which the response starts (checked in custom templates)."""
    system: str = ""
    """System message for the chat template (empty = the template's default)."""
    permute_options: int = 1
    """MCQ only: show each training question under this many option orders (rotations, answer letter
    relabelled; at most the option count), so the letter prior carries nothing. 1 = as given."""
    max_len: int = 512
    """Tokens per example; prompts this long are skipped, long responses cut (both counted)."""
    packing: bool = False
    """Pack examples into rows of max_len tokens instead of padding each micro-batch."""



@dataclass
class SFTTrainSection(TrainSection):
    """The pretraining loop's fields with seed 000's defaults: 3 epochs, micro-batch 4 with accumulation."""

    max_steps: int = 0
    """Optimizer steps; 0 = derive from epochs."""
    epochs: float = 3.0
    """Passes over the training split."""
    batch_size: int = 4
    """Examples per micro-batch."""
    grad_accum: int = 4
    """Micro-batches per optimizer step (token-weighted)."""
    eval_every: int = 0
    """Validation loss every N steps (and at the end); 0 = only at the end."""
    seed: int = 42
    """Seeds LoRA init, dropout and batch order."""



@dataclass
class SFTOptimSection(OptimSection):
    """AdamW over the adapter weights only (the pretraining recipe's fields, LoRA defaults)."""

    impl: OptimImpl = "torch"
    """lmlab's own AdamW or torch.optim.AdamW (default, foreach or fused kernel)."""
    lr: float = 2e-4
    """Peak learning rate (typical for LoRA; seed 000)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam beta1, beta2."""
    weight_decay: float = 0.0
    """Decoupled weight decay on the adapter matrices."""



@dataclass
class SFTEvalSection:
    """What is measured before and after tuning."""

    perplexity: bool = True
    """Plain and conditional (response | instruction) perplexity on the test split, before and after."""
    batch_size: int = 8
    """Examples per evaluation forward pass."""
    instructions: list[str] = field(default_factory=lambda: list(NOVEL_INSTRUCTIONS))
    """Novel instructions to answer after tuning (empty = none)."""
    max_new_tokens: int = 128
    """Tokens generated per instruction."""
    temperature: float = 0.7
    """Sampling temperature for the samples (seed 000: 0.7)."""
    top_p: float = 0.9
    """Nucleus mass for the samples (seed 000: 0.9)."""



@dataclass
class SFTConfig:
    """A LoRA instruction-tuning run (`lmlab sft`)."""

    out_dir: str = "runs/sft"
    """Run folder."""
    adapter: str = ""
    """Adapter (task) name: adapters/<name>/ in the run folder; empty = data.source."""
    model: ModelSection = field(default_factory=ModelSection)
    """Base model (any lmlab.weights.loading spec)."""
    data: InstructDataSection = field(default_factory=InstructDataSection)
    """Records, split and template."""
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(rank=16, alpha=32.0, dropout=0.05))
    """Adapter shape (seed 000: r 16, alpha 32, dropout 0.05, q and v)."""
    train: SFTTrainSection = field(default_factory=SFTTrainSection)
    """Epochs and batches."""
    optim: SFTOptimSection = field(default_factory=SFTOptimSection)
    """Optimizer."""
    schedule: ScheduleSection = field(default_factory=lambda: ScheduleSection(warmup_steps=10))
    """Learning-rate schedule."""
    precision: PrecisionSection = field(default_factory=lambda: PrecisionSection(dtype="bf16"))
    """Device and autocast dtype."""
    logging: LoggingSection = field(default_factory=LoggingSection)
    """metrics.jsonl cadence, progress bar."""
    checkpoint: CheckpointSection = field(default_factory=lambda: CheckpointSection(best=False))
    """Adapter + optimizer checkpoints every N steps (checkpoints/step_N/, atomic) and resume."""
    eval: SFTEvalSection = field(default_factory=SFTEvalSection)
    """Perplexity and samples."""
    export_peft: bool = True
    """Also write the adapter in the peft format (adapters/<name>-peft/)."""
