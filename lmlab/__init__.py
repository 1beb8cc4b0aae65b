"""lmlab: one toolkit to build, pretrain, fine-tune, align, evaluate and sample small decoder-only LMs."""

__version__ = "0.1.0"
