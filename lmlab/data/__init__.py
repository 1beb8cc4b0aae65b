"""Data pipelines: raw corpora (corpus.py) and pretraining token shards and batches (pretrain.py).

A training batch source is any callable `(step, micro) -> batch dict`; the loop never asks for more.
"""

from lmlab.data.corpus import read_documents
from lmlab.data.pretrain import (
    Layout,
    PaddedChunks,
    RandomWindows,
    TokenSplit,
    build_shards,
    check_length,
    eval_batches,
)

__all__ = [
    "Layout", "PaddedChunks", "RandomWindows", "TokenSplit", "build_shards", "check_length", "eval_batches",
    "read_documents",
]
