"""The DPO recipe (`lmlab dpo`) and the preference-data section it shares with the reward model (`lmlab reward`).

Defaults follow TRL's DPOTrainer where it has one (beta 0.1, sigmoid loss, dropout off so the policy starts
equal to its reference) and lmlab's LoRA SFT recipe otherwise (bf16 autocast, AdamW over the adapters).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from lmlab.schema.load import Section
from lmlab.schema.sections import (
    FinetuneModelSection,
    LoRAConfig,
    Probability,
    RecipeConfig,
    SamplingConfig,
)
from lmlab.schema.sft import AdapterCheckpoints, BF16Precision, SFTOptimSection, SFTScheduleSection, SFTTrainSection


class PreferenceDataSection(Section):
    """Preference pairs: where they come from, how they are split, templated and cut."""

    paths: list[str] = Field(default_factory=list)
    """JSONL files of pairs (TRL preference format or HH-RLHF dialogues), pooled before the split."""
    format: Literal["auto", "trl", "hh"] = "auto"
    """auto = per line: HH-RLHF when chosen/rejected are dialogues without a prompt, else TRL's format."""
    split: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=3, max_length=3)] = \
        Field(default_factory=lambda: [8, 1, 1])
    """train : validation : test ratios of the pooled pairs (written to pairs/{train,val,test}.jsonl)."""
    split_seed: int = Field(42, ge=0)
    """Seed of the shuffle before the split (the same seed gives the DPO and reward runs the same split)."""
    max_train: int = Field(0, ge=0)
    """Cap on training pairs after the split (0 = all): CPU-sized runs."""
    max_eval: int = Field(0, ge=0)
    """Cap on validation and test pairs after the split (0 = all)."""
    template: Literal["auto", "chat", "plain"] = "auto"
    """auto: conversational pairs through the tokenizer's chat template (HH-style text without one), string
    pairs as plain text + EOS; chat: require the template; plain: never use it."""
    system: str = ""
    """System message for the chat template when the prompt has none (empty = the template's default)."""
    max_len: int = Field(512, ge=2)
    """Tokens per sequence (prompt + one response); responses are cut to fit (their start is kept)."""
    max_prompt_len: int = Field(256, ge=0)
    """Prompts longer than this keep their last max_prompt_len tokens; 0 = no separate budget (a pair whose
    prompt alone fills max_len is then an error naming its line)."""

    @model_validator(mode="after")
    def _prompt_fits(self) -> PreferenceDataSection:
        if self.max_prompt_len and self.max_prompt_len >= self.max_len:
            raise ValueError(f"data.max_prompt_len={self.max_prompt_len} must be below data.max_len={self.max_len} "
                             "(or 0), so every response keeps at least one token")
        return self


class DPOSection(Section):
    """The preference loss and where its reference comes from."""

    method: Literal["lora", "full"] = "lora"
    """lora: adapters train, the reference is the same model with them disabled (no copy); full: every
    weight trains against a frozen copy."""
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """sigmoid = DPO (cDPO with label_smoothing), ipo = IPO (length-normalised, as TRL), hinge = SLiC."""
    beta: float = Field(0.1, gt=0.0)
    """Strength of the pull towards the reference (IPO's tau); rewards are beta x log-ratios."""
    label_smoothing: Annotated[float, Field(ge=0.0, lt=0.5)] = 0.0
    """cDPO: the assumed probability that a preference label is flipped (sigmoid loss only)."""
    sft_weight: float = Field(0.0, ge=0.0)
    """Weight of an SFT term (the chosen response's mean token NLL, RPO); 0 = none."""
    precompute_reference: bool = False
    """Compute the reference log-probs once before training and cache them on disk (reused by later runs
    with the same data, model, template and precision); training then runs no reference forward."""
    cache_dir: str = Field("runs/reference-cache", min_length=1)
    """Folder of the reference cache (shared by runs)."""


class DPOLoRA(LoRAConfig):
    """The adapter: r 16, alpha 32 on every attention and MLP projection, no dropout (so at step 0 the
    policy equals the reference exactly, as TRL's disable_dropout)."""

    rank: int = Field(16, ge=1)
    """r, the rank of B A."""
    alpha: float = Field(32.0, gt=0.0)
    """Scale numerator: the update is multiplied by alpha / r."""
    dropout: Probability = 0.0
    """Dropout on the LoRA path's input only."""
    target_modules: Annotated[list[str], Field(min_length=1)] = \
        Field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    """Linear layers to adapt (attention wq wk wv wo; MLP w1 w2 w3)."""


class DPOTrainSection(SFTTrainSection):
    """One epoch of 16 pairs per step (4 x 4), evaluated at the end."""

    epochs: float = Field(1.0, ge=0.0)
    """Passes over the training pairs."""


class DPOOptimSection(SFTOptimSection):
    """AdamW over the adapters."""

    lr: float = Field(5e-5, gt=0.0)
    """Peak learning rate."""


class DPOEvalSection(SamplingConfig):
    """Held-out evaluation: pair accuracies before and after, and the generation-level check."""

    batch_size: int = Field(8, ge=1)
    """Pairs per evaluation forward pass."""
    reward_model: str = ""
    """A reward run folder (`lmlab reward`): sample responses to test prompts from the reference and the
    policy, score both with it, report the policy's win rate. Empty = skip the check."""
    prompts: int = Field(200, ge=0)
    """Test prompts to sample for the check (0 = every test pair's prompt)."""
    max_new_tokens: int = Field(128, ge=1)
    """Tokens generated per response."""
    generation_batch_size: int = Field(8, ge=1)
    """Prompts decoded together."""
    temperature: float = Field(0.7, ge=0.0)
    """Sampling temperature of the check (fixed seed: train.seed)."""


class DPOCheckpoints(AdapterCheckpoints):
    """Adapter (or model) checkpoints every N steps, and resume."""

    best: bool = False
    """Keep checkpoints/best at the lowest validation DPO loss (evaluated every train.eval_every steps; else
    once per epoch, or only at the end of a run sized by train.max_steps), and test, sample and save that
    state rather than the last one."""


class DPOConfig(RecipeConfig):
    """A DPO run (`lmlab dpo`)."""

    out_dir: str = Field("runs/dpo", min_length=1)
    """Run folder."""
    adapter: str = "dpo"
    """Adapter name: adapters/<name>/ (lmlab) and adapters/<name>-peft/ in the run folder."""
    model: FinetuneModelSection = Field(default_factory=FinetuneModelSection)
    """Policy (and reference) model."""
    data: PreferenceDataSection = Field(default_factory=PreferenceDataSection)
    """Pairs, split, template and truncation."""
    dpo: DPOSection = Field(default_factory=DPOSection)
    """Loss and reference."""
    lora: DPOLoRA = Field(default_factory=DPOLoRA)
    """Adapter shape (dpo.method=lora)."""
    train: DPOTrainSection = Field(default_factory=DPOTrainSection)
    """Epochs and batches (batch_size = pairs per micro-batch)."""
    optim: DPOOptimSection = Field(default_factory=DPOOptimSection)
    """Optimizer."""
    schedule: SFTScheduleSection = Field(default_factory=SFTScheduleSection)
    """Learning-rate schedule."""
    precision: BF16Precision = Field(default_factory=BF16Precision)
    """Device and autocast dtype."""
    checkpoint: DPOCheckpoints = Field(default_factory=DPOCheckpoints)
    """Checkpoints every N steps and resume; optionally end on the lowest validation loss."""
    eval: DPOEvalSection = Field(default_factory=DPOEvalSection)
    """Held-out pairs and the generation-level check."""
    export_peft: bool = True
    """Also write the adapter in the peft format (adapters/<name>-peft/)."""
