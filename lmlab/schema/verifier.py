"""The GSM8K verifier recipe (`lmlab verifier sample|train|eval`), after Cobbe et al. 2021, "Training
Verifiers to Solve Math Word Problems": a generator samples K solutions per training problem, each labelled
by its final answer; a scalar head on a backbone learns to predict that label (a value at every solution
token, or one per solution, optionally with the language-modelling loss beside it); at test time it
picks the best of N samples. CPU defaults are sized to finish; the paper's scale (100 samples for each of
7,473 problems, 2 epochs) is the same recipe with bigger numbers.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from lmlab.data.instruct import ALPACA_MARKER
from lmlab.schema.load import Section
from lmlab.schema.sections import (
    FinetuneModelSection,
    LoRAConfig,
    Probability,
    RecipeConfig,
    SamplingConfig,
    TrainSection,
)
from lmlab.schema.sft import AdapterCheckpoints, BF16Precision, SFTOptimSection, SFTScheduleSection


class GeneratorSection(SamplingConfig):
    """The model that writes the solutions and how it samples them (training problems and test problems)."""

    spec: str = "smollm2-135m-instruct"
    """Any lmlab.weights.loading spec (a pipeline sets it to the previous stage's model)."""
    adapter: str = ""
    """An adapter folder (lmlab or peft) put on the generator, e.g. runs/sft-gsm8k/adapters/math."""
    tokenizer: str = ""
    """Tokenizer path when the model carries none."""
    samples: int = Field(4, ge=1)
    """K solutions per training problem (Cobbe et al.: 100)."""
    temperature: float = Field(0.7, ge=0.0)
    """Sampling temperature (Cobbe et al. sample at 0.7)."""
    max_new_tokens: int = Field(256, ge=1)
    """Tokens per solution; a solution cut here usually has no final answer and is labelled wrong."""
    batch_size: int = Field(32, ge=1)
    """Solutions decoded together: batch_size // K problems per batch (at least one), each prefilled once
    and its cache shared by its K rows."""
    seed: int = Field(0, ge=0)
    """Base seed: solution k of problem i draws from its own generator, so it does not depend on batching."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Weights dtype for generation (auto = bf16 where the CPU has native bf16)."""


class VerifierDataSection(Section):
    """Problems, their prompt format and the held-out share."""

    train_path: str = ""
    """GSM8K training problems (JSONL question/answer): sampled, labelled, trained on; empty = gsm8k/train.jsonl
    in the shared data folder."""
    test_path: str = ""
    """GSM8K test problems for best-of-N; empty = gsm8k/test.jsonl in the shared data folder."""
    problems: int = Field(64, ge=0)
    """Training problems to sample (a seeded subset; 0 = all 7,473)."""
    heldout: Probability = 0.2
    """Share of those problems held out of verifier training: their samples give the AUC and pick the state."""
    gold: bool = True
    """Add each training problem's reference solution as a positive (Cobbe et al. train on samples only)."""
    seed: int = Field(42, ge=0)
    """Seed of the problem subsets and the held-out split."""
    template: Literal["alpaca", "chat", "custom"] = "chat"
    """Prompt format (the generator's: alpaca, the model's chat template, or custom_template)."""
    custom_template: str = ""
    """With template=custom: text with {instruction}, ending with response_marker."""
    response_marker: str = ALPACA_MARKER
    """Text after which the response starts (custom templates)."""
    system: str = ""
    """System message for the chat template (empty = the template's default)."""
    max_len: int = Field(512, ge=2)
    """Tokens of prompt + solution fed to the verifier; longer solutions are cut (counted)."""


class VerifierSection(Section):
    """The verifier: what it predicts, with what, and how it trains."""

    target: Literal["token", "solution"] = "token"
    """token: a value at every solution token, each trained on the solution's label (Cobbe et al.'s better
    verifier); solution: one value per solution, at its last token. Both rank by the last token's value."""
    lm_coef: float = Field(0.0, ge=0.0)
    """Weight of the language-modelling loss on the solution tokens beside the value loss (the paper's joint
    objective); 0 = value loss only."""
    method: Literal["lora", "full"] = "lora"
    """lora: adapters + head train (the backbone stays as loaded); full: every weight trains."""
    dropout: Probability = 0.0
    """Dropout before the head."""
    head_lr_mult: float = Field(10.0, gt=0.0)
    """Head learning rate = optim.lr times this (a fresh head learns slowly at adapter rates)."""
    eval_batch_size: int = Field(8, ge=1)
    """Solutions per scoring forward pass."""


class VerifierModelSection(FinetuneModelSection):
    """The verifier's backbone (Cobbe et al. start it from the generator's pretrained model)."""

    spec: str = ""
    """Any lmlab.weights.loading spec; empty = generator.spec (without its adapter)."""


class VerifierLoRA(LoRAConfig):
    """Adapters on every attention and MLP projection (as the classification heads use); the head trains too."""

    rank: int = Field(16, ge=1)
    """r, the rank of B A."""
    alpha: float = Field(32.0, gt=0.0)
    """Scale numerator: the update is multiplied by alpha / r."""
    dropout: Probability = 0.05
    """Dropout on the LoRA path's input only."""
    target_modules: Annotated[list[str], Field(min_length=1)] = \
        Field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    """Linear layers to adapt (attention wq wk wv wo; MLP w1 w2 w3)."""


class VerifierTrainSection(TrainSection):
    """Epochs over the labelled solutions (Cobbe et al.: 2)."""

    max_steps: int = Field(0, ge=0)
    """Optimizer steps; 0 = derive from epochs."""
    epochs: float = Field(2.0, ge=0.0)
    """Passes over the labelled training solutions."""
    batch_size: int = Field(4, ge=1)
    """Solutions per micro-batch."""
    grad_accum: int = Field(4, ge=1)
    """Micro-batches per optimizer step."""
    eval_every: int = Field(0, ge=0)
    """Held-out loss and AUC every N steps (and at the end); 0 = at the end of each epoch."""
    seed: int = Field(42, ge=0)
    """Seeds LoRA init, dropout and batch order."""


class VerifierCheckpoints(AdapterCheckpoints):
    """Adapter + head checkpoints; the state with the best held-out AUC is kept and used."""

    best: bool = True
    """Keep checkpoints/best at the best held-out AUC and end the run on it."""


class VerifierEvalSection(Section):
    """Best-of-N on test problems: greedy pass@1, majority vote, verifier best-of-N and weighted vote,
    oracle pass@N."""

    problems: int = Field(50, ge=0)
    """Test problems (a seeded subset; 0 = all 1,319)."""
    samples: int = Field(16, ge=1)
    """Solutions sampled per test problem (the largest N)."""
    n: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)] = Field(default_factory=lambda: [1, 4, 16])
    """N values of the table and plot; each at most `samples`."""
    subsets: int = Field(64, ge=1)
    """Random size-N subsets of a problem's samples averaged per N < samples (lower variance than one)."""
    greedy: bool = True
    """Also decode each test problem greedily (the pass@1 baseline)."""
    seed: int = Field(1234, ge=0)
    """Seed of the test subset, the test samples and the N-subsets."""

    @model_validator(mode="after")
    def _n_within_samples(self) -> VerifierEvalSection:
        if max(self.n) > self.samples:
            raise ValueError(f"eval.n={self.n}: every N must be at most eval.samples={self.samples}")
        return self


class VerifierConfig(RecipeConfig):
    """A verifier run: sample -> train -> eval in one folder (`lmlab verifier`)."""

    out_dir: str = Field("runs/verifier", min_length=1)
    """Run folder: samples/, the training session's files, verifier/, eval/."""
    model: VerifierModelSection = Field(default_factory=VerifierModelSection)
    """The verifier's backbone."""
    generator: GeneratorSection = Field(default_factory=GeneratorSection)
    """The solution sampler."""
    data: VerifierDataSection = Field(default_factory=VerifierDataSection)
    """Problems and prompts."""
    verifier: VerifierSection = Field(default_factory=VerifierSection)
    """Target, joint LM loss, LoRA or full."""
    lora: VerifierLoRA = Field(default_factory=VerifierLoRA)
    """Adapters (verifier.method=lora)."""
    train: VerifierTrainSection = Field(default_factory=VerifierTrainSection)
    """Epochs and batches."""
    optim: SFTOptimSection = Field(default_factory=SFTOptimSection)
    """Optimizer (LoRA rates by default)."""
    schedule: SFTScheduleSection = Field(default_factory=SFTScheduleSection)
    """Learning-rate schedule."""
    precision: BF16Precision = Field(default_factory=BF16Precision)
    """Device and autocast dtype."""
    checkpoint: VerifierCheckpoints = Field(default_factory=VerifierCheckpoints)
    """Checkpoints, the best held-out state, resume."""
    eval: VerifierEvalSection = Field(default_factory=VerifierEvalSection)
    """Best-of-N evaluation."""

    @property
    def backbone_spec(self) -> str:
        return self.model.spec or self.generator.spec
