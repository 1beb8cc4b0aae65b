"""The pipeline recipe (`lmlab pipeline RECIPE.yaml [stage.a.b=c ...]`): one file with a section per stage
(pretrain -> sft -> reward -> dpo -> verifier, seed 001's alignment pipeline with a reward model for DPO's
win rate), each section a whole recipe of that
stage's kind, plus the report card's settings. The schema is assembled from the stage kinds the running
lmlab has (`pipeline_schema`), so `sft.train.max_steps=200` is checked by the SFT schema and an unknown
key anywhere is one line naming it.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, create_model

from lmlab.schema.load import Section
from lmlab.schema.sections import RecipeConfig, SamplingConfig

STAGE_ORDER = ("pretrain", "sft", "reward", "dpo", "verifier")
"""The stages in the order a chain runs them; each stage's output model is the next one's input (the reward
stage scores, it does not change the model: its input goes on to DPO, which samples against it)."""

REPORT_PROMPTS = [
    "Give three tips for staying healthy.",
    "Explain why the sky is blue in two sentences.",
    "Tom has 3 apples and buys 5 more. How many apples does he have?",
]


class ReportSection(SamplingConfig):
    """The report card: what is measured on every stage's model (the sampling fields apply to the answers)."""

    prompts: list[str] = Field(default_factory=lambda: list(REPORT_PROMPTS))
    """Instructions every stage's model answers (the SFT stage's template; the same prompts for each)."""
    max_new_tokens: int = Field(64, ge=1)
    """Tokens per answer."""
    temperature: float = Field(0.0, ge=0.0)
    """0 = greedy answers (comparable across stages)."""
    wikitext: str = ""
    """Text scored for perplexity; empty = the shared data folder's wikitext-2/test.txt (seed 001's table)."""
    ppl_tokens: int = Field(16384, ge=0)
    """Tokens of it scored (0 = all; the whole WikiText-2 test split is ~280k GPT-2 tokens)."""
    ppl_context: int = Field(256, ge=2)
    """Window of the sliding-window perplexity (capped at each model's context), stride half of it."""
    alpaca_records: int = Field(100, ge=0)
    """Alpaca test records (the SFT stage's own test split) for the conditional perplexity; 0 = none."""
    batch_size: int = Field(8, ge=1)
    """Sequences per evaluation forward pass."""


class PipelineBase(Section):
    """What a pipeline file has besides its stage sections."""

    out_dir: str = Field("runs/pipeline", min_length=1)
    """Pipeline folder: pipeline.yaml, stages.json, one run folder per stage (<out_dir>/<stage>), report.md."""
    stages: Annotated[list[str], Field(min_length=1)] = Field(default_factory=lambda: list(STAGE_ORDER))
    """The chain, in order (pretrain, sft, reward, dpo, verifier, or a part of it); each needs its section. A section
    whose stage is not listed is checked and not run."""
    report: ReportSection = Field(default_factory=ReportSection)
    """The report card."""


STAGE_DOCS = {
    "pretrain": "Pretraining recipe (lmlab run); its final checkpoint feeds the next stage.",
    "sft": "Instruction-tuning recipe (lmlab sft); the base with its adapter merged feeds the next stage.",
    "reward": ("Reward-model recipe (lmlab reward) on the previous model; it scores DPO's generation check "
               "(dpo.eval.reward_model) and passes its input model on."),
    "dpo": "DPO recipe (lmlab dpo); the policy with its adapter merged feeds the next stage.",
    "verifier": "Verifier recipe (lmlab verifier all); the previous model is its generator and backbone.",
}


def pipeline_schema(stages: dict[str, type[RecipeConfig]]) -> type[PipelineBase]:
    """PipelineBase + one optional section per available stage kind, typed by that kind's schema."""
    fields: dict[str, Any] = {name: (schema | None, Field(None, description=STAGE_DOCS.get(name)))
                              for name, schema in stages.items()}
    return create_model("PipelineConfig", __base__=PipelineBase, **fields)
