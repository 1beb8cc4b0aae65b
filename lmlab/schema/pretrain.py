"""The pretraining recipe (`lmlab run`): a corpus, a tokenizer, a fresh or loaded model, the LM loss."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmlab.schema.load import Section
from lmlab.schema.sections import DistributedSection, ModelSection, Probability, RecipeConfig, SamplingConfig


class PretrainModelSection(ModelSection):
    """What to build or continue from: usually a preset (random init) with ModelConfig overrides."""

    spec: str = "preset:llama2c-stories260k"
    """preset:NAME builds a fresh model from lmlab.model.config.PRESETS; any other spec loads its weights."""
    vocab_from_tokenizer: bool = True
    """For a fresh preset: set vocab_size to the tokenizer's (unless overridden)."""


class CorpusSection(Section):
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
    val_fraction: Probability = 0.1
    """Share of the corpus (tokens, or documents in chunk mode) held out for validation."""
    tokenizer: str = "char"
    """`char` (built from the corpus) or a path lmlab.tokenization.load_tokenizer reads."""
    seq_len: int = Field(0, ge=0)
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
    val_batches: int = Field(0, ge=0)
    """Validation batches per evaluation; 0 = the whole validation split."""


class SampleSection(SamplingConfig):
    """Optional text samples written to samples.txt after training (any sampling knob applies)."""

    prompts: list[str] = Field(default_factory=list)
    """Prompts to continue; empty = no samples."""
    max_new_tokens: int = Field(100, ge=1)
    """Tokens to generate per prompt."""
    temperature: float = Field(0.8, ge=0.0)
    """Sampling temperature (0 = greedy)."""


class PretrainConfig(RecipeConfig):
    """A pretraining run (`lmlab run`)."""

    model: PretrainModelSection = Field(default_factory=PretrainModelSection)
    """What to build or load."""
    data: CorpusSection = Field(default_factory=CorpusSection)
    """Corpus, tokenizer and batching."""
    sample: SampleSection = Field(default_factory=SampleSection)
    """Samples after training."""
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    """torchrun settings."""
