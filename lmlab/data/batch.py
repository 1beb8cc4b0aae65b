"""What a batch is: a dict of tensors; IGNORE_INDEX marks targets that count for nothing; right padding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

IGNORE_INDEX = -100
"""A label the losses skip: padding, prompt tokens, examples that count for nothing."""

Batch = dict[str, Tensor]
"""A micro-batch: `input_ids` and whatever else the objective reads (labels, masks, lengths)."""


def right_pad(seqs: Sequence[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad to the longest: (input_ids, attention_mask), both (B, T). (Generation's left padding is
    `lmlab.generation.generate.left_pad`.)"""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_id_of(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad, else its EOS, else 0 (padding is masked either way)."""
    for tid in (tokenizer.pad_id, tokenizer.eos_id, 0):
        if tid is not None:
            return tid
    return 0
