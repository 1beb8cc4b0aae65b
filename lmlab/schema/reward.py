"""The reward-model recipe (`lmlab reward`): a backbone + one-output head trained with Bradley-Terry on pairs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmlab.schema.dpo import DPOLoRA, DPOOptimSection, DPOTrainSection, PreferenceDataSection
from lmlab.schema.load import Section
from lmlab.schema.sections import FinetuneModelSection, Probability, RecipeConfig
from lmlab.schema.sft import AdapterCheckpoints, BF16Precision, SFTScheduleSection


class RewardSection(Section):
    """The scorer and its loss."""

    method: Literal["lora", "full"] = "lora"
    """lora: adapters + the head train; full: every weight and the head."""
    center: float = Field(0.0, ge=0.0)
    """Reward centring: adds center x (r_chosen + r_rejected)^2 per pair (Eisenstein et al. 2023 use 0.01),
    so rewards stay near zero and comparable across prompts."""
    head_lr_mult: float = Field(1.0, gt=0.0)
    """Head learning rate = optim.lr times this."""
    dropout: Probability = 0.0
    """Dropout before the head."""


class RewardEvalSection(Section):
    """Held-out scoring."""

    batch_size: int = Field(8, ge=1)
    """Pairs per evaluation forward pass."""


class RewardOptimSection(DPOOptimSection):
    """AdamW over the adapters and the head."""

    lr: float = Field(1e-4, gt=0.0)
    """Peak learning rate."""


class RewardCheckpoints(AdapterCheckpoints):
    """Adapter + head checkpoints every N steps, and resume."""

    best: bool = False
    """Keep checkpoints/best at the highest validation accuracy (evaluated every train.eval_every steps; else
    once per epoch, or only at the end of a run sized by train.max_steps), and test and save that state rather
    than the last one."""


class RewardConfig(RecipeConfig):
    """A reward-model run (`lmlab reward`)."""

    out_dir: str = Field("runs/reward", min_length=1)
    """Run folder."""
    model: FinetuneModelSection = Field(default_factory=FinetuneModelSection)
    """Backbone."""
    data: PreferenceDataSection = Field(default_factory=PreferenceDataSection)
    """Pairs, split, template and truncation (the same keys as `lmlab dpo`: the same values, the same split)."""
    reward: RewardSection = Field(default_factory=RewardSection)
    """Method and loss."""
    lora: DPOLoRA = Field(default_factory=DPOLoRA)
    """Adapter shape (reward.method=lora); the head always trains and is saved with it."""
    train: DPOTrainSection = Field(default_factory=DPOTrainSection)
    """Epochs and batches (batch_size = pairs per micro-batch)."""
    optim: RewardOptimSection = Field(default_factory=RewardOptimSection)
    """Optimizer."""
    schedule: SFTScheduleSection = Field(default_factory=SFTScheduleSection)
    """Learning-rate schedule."""
    precision: BF16Precision = Field(default_factory=BF16Precision)
    """Device and autocast dtype."""
    checkpoint: RewardCheckpoints = Field(default_factory=RewardCheckpoints)
    """Checkpoints every N steps and resume; optionally end on the best validation accuracy."""
    eval: RewardEvalSection = Field(default_factory=RewardEvalSection)
    """Held-out scoring."""
