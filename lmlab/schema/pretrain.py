"""The pretraining recipe (`lmlab run`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmlab.schema.sections import (
    CheckpointSection,
    DataSection,
    DistributedSection,
    LoggingSection,
    ModelSection,
    OptimSection,
    PrecisionSection,
    SampleSection,
    ScheduleSection,
    TrainSection,
)


@dataclass
class RunConfig:
    """A pretraining run (`lmlab run`)."""

    out_dir: str = "runs/run"
    """Run folder: config.yaml, metrics.jsonl, summary.json, checkpoints/."""
    model: ModelSection = field(default_factory=ModelSection)
    """What to build or load."""
    data: DataSection = field(default_factory=DataSection)
    """Corpus, tokenizer and batching."""
    train: TrainSection = field(default_factory=TrainSection)
    """Loop length and batch geometry."""
    optim: OptimSection = field(default_factory=OptimSection)
    """Optimizer."""
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    """Learning-rate schedule."""
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    """Device and dtype."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Saving and resuming."""
    logging: LoggingSection = field(default_factory=LoggingSection)
    """Metrics, progress bar, TensorBoard."""
    sample: SampleSection = field(default_factory=SampleSection)
    """Samples after training."""
    distributed: DistributedSection = field(default_factory=DistributedSection)
    """torchrun settings."""
