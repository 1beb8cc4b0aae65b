"""The instruction-tuning recipe (`lmlab sft`): LoRA SFT, QA, summarization and math adapters (seed 000)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from lmlab.data.instruct import ALPACA_MARKER
from lmlab.schema.load import Section
from lmlab.schema.sections import (
    CheckpointSection,
    FinetuneModelSection,
    LoRAConfig,
    OptimImpl,
    OptimSection,
    PrecisionSection,
    Probability,
    RecipeConfig,
    SamplingConfig,
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


class InstructDataSection(Section):
    """Where the records come from, how they are split and templated."""

    source: Literal["alpaca", "mcq", "saq", "dialogsum", "gsm8k", "sst2"] = "alpaca"
    """Reader: alpaca JSON/JSONL; mcq (MMLU csv folder / ARC jsonl); saq (NQ-open jsonl); dialogsum; gsm8k;
    sst2 (an SST-5 `LABEL ||| text` file, neutral dropped)."""
    paths: list[str] = Field(default_factory=list)
    """Data files (records of all are pooled before the split)."""
    test_paths: list[str] = Field(default_factory=list)
    """Separate test files (e.g. GSM8K test.jsonl); when set they replace the split's test part."""
    split: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=3, max_length=3)] = \
        Field(default_factory=lambda: [5, 1, 1])
    """train : validation : test ratios (seed 000: 10k/2k/2k of a seeded subset)."""
    split_seed: int = Field(42, ge=0)
    """Seed of the shuffle before the split."""
    subset: int = Field(0, ge=0)
    """Keep this many shuffled records before splitting (0 = all)."""
    max_train: int = Field(0, ge=0)
    """Cap on training examples after the split (0 = all): CPU-sized runs."""
    max_eval: int = Field(0, ge=0)
    """Cap on validation and test examples (0 = all)."""
    template: Literal["alpaca", "chat", "custom"] = "alpaca"
    """Prompt format: Stanford Alpaca's, the model's chat template, or custom_template."""
    custom_template: str = ""
    """With template=custom: text with {instruction}, optional {input}, ending with response_marker."""
    response_marker: str = ALPACA_MARKER
    """Text after which the response starts (checked in custom templates)."""
    system: str = ""
    """System message for the chat template (empty = the template's default)."""
    permute_options: int = Field(1, ge=1)
    """MCQ only: show each training question under this many option orders (rotations, answer letter
    relabelled; at most the option count), so the letter prior carries nothing. 1 = as given."""
    max_len: int = Field(512, ge=2)
    """Tokens per example; prompts this long are skipped, long responses cut (both counted)."""
    packing: bool = False
    """Pack examples into rows of max_len tokens instead of padding each micro-batch."""


class SFTLoRA(LoRAConfig):
    """Seed 000's adapter: r 16, alpha 32, dropout 0.05, on q and v."""

    rank: int = Field(16, ge=1)
    """r, the rank of B A."""
    alpha: float = Field(32.0, gt=0.0)
    """Scale numerator: the update is multiplied by alpha / r."""
    dropout: Probability = 0.05
    """Dropout on the LoRA path's input only."""


class SFTTrainSection(TrainSection):
    """The shared loop fields with seed 000's defaults: 3 epochs, micro-batch 4 with accumulation 4."""

    max_steps: int = Field(0, ge=0)
    """Optimizer steps; 0 = derive from epochs."""
    epochs: float = Field(3.0, ge=0.0)
    """Passes over the training split."""
    batch_size: int = Field(4, ge=1)
    """Examples per micro-batch."""
    grad_accum: int = Field(4, ge=1)
    """Micro-batches per optimizer step (token-weighted)."""
    eval_every: int = Field(0, ge=0)
    """Validation loss every N steps (and at the end); 0 = at the end of each epoch."""
    seed: int = Field(42, ge=0)
    """Seeds LoRA init, dropout and batch order."""


class SFTOptimSection(OptimSection):
    """AdamW over the adapter weights only (the shared fields, LoRA defaults)."""

    impl: OptimImpl = "torch"
    """lmlab's own AdamW or torch.optim.AdamW (default, foreach or fused kernel)."""
    lr: float = Field(2e-4, gt=0.0)
    """Peak learning rate (typical for LoRA; seed 000)."""
    betas: Annotated[list[Probability], Field(min_length=2, max_length=2)] = Field(default_factory=lambda: [0.9, 0.999])
    """Adam beta1, beta2."""
    weight_decay: float = Field(0.0, ge=0.0)
    """Decoupled weight decay on the adapter matrices."""


class SFTScheduleSection(ScheduleSection):
    """Cosine after a short warmup."""

    warmup_steps: int = Field(10, ge=0)
    """Linear warmup from 0 to lr."""


class BF16Precision(PrecisionSection):
    """bf16 autocast where the hardware has it (about 2x faster than fp32 on CPUs with native bf16, ~20x
    slower on AVX2-only CPUs, which then train in fp32); weights stay fp32."""

    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast dtype; auto = bf16 where native (CUDA, AVX512-BF16 / AMX CPUs), else fp32; fp16 (CUDA only)
    adds a gradient scaler. Weights stay fp32."""


class AdapterCheckpoints(CheckpointSection):
    """Adapter + optimizer checkpoints (trainable weights only, megabytes) every N steps, and resume."""

    best: bool = False
    """Also keep checkpoints/best at the lowest validation loss."""


class SFTEvalSection(SamplingConfig):
    """What is measured before and after tuning; the sampling fields apply to the samples."""

    perplexity: bool = True
    """Plain and conditional (response | instruction) perplexity on the test split, before and after."""
    batch_size: int = Field(8, ge=1)
    """Examples per evaluation forward pass."""
    instructions: list[str] = Field(default_factory=lambda: list(NOVEL_INSTRUCTIONS))
    """Novel instructions to answer after tuning (empty = none)."""
    max_new_tokens: int = Field(128, ge=1)
    """Tokens generated per instruction."""
    temperature: float = Field(0.7, ge=0.0)
    """Sampling temperature for the samples (seed 000: 0.7)."""
    top_p: float | None = Field(0.9, gt=0.0, le=1.0)
    """Nucleus mass for the samples (seed 000: 0.9)."""


class SFTConfig(RecipeConfig):
    """A LoRA instruction-tuning run (`lmlab sft`)."""

    out_dir: str = Field("runs/sft", min_length=1)
    """Run folder."""
    adapter: str = ""
    """Adapter (task) name: adapters/<name>/ in the run folder; empty = data.source."""
    model: FinetuneModelSection = Field(default_factory=FinetuneModelSection)
    """Base model (any lmlab.weights.loading spec)."""
    data: InstructDataSection = Field(default_factory=InstructDataSection)
    """Records, split and template."""
    lora: SFTLoRA = Field(default_factory=SFTLoRA)
    """Adapter shape (seed 000: r 16, alpha 32, dropout 0.05, q and v)."""
    train: SFTTrainSection = Field(default_factory=SFTTrainSection)
    """Epochs and batches."""
    optim: SFTOptimSection = Field(default_factory=SFTOptimSection)
    """Optimizer."""
    schedule: SFTScheduleSection = Field(default_factory=SFTScheduleSection)
    """Learning-rate schedule."""
    precision: BF16Precision = Field(default_factory=BF16Precision)
    """Device and autocast dtype."""
    checkpoint: AdapterCheckpoints = Field(default_factory=AdapterCheckpoints)
    """Adapter + optimizer checkpoints every N steps (checkpoints/step_N/, atomic) and resume."""
    eval: SFTEvalSection = Field(default_factory=SFTEvalSection)
    """Perplexity and samples."""
    export_peft: bool = True
    """Also write the adapter in the peft format (adapters/<name>-peft/)."""
