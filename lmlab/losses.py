"""Objectives as pure functions of (model, batch) -> (sum_loss, n_tokens) (torchtune `rlhf/loss` style).

Returning a *sum* and a *count* lets the loop weight every unmasked token equally across
micro-batches and processes: it adds the sums, adds the counts, and divides once. A per-micro-batch
mean would silently give tokens in a padded or prompt-masked micro-batch more weight (nanoGPT
issue 168). Labels equal to IGNORE_INDEX (-100) mark padding and prompt tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100

Batch = dict[str, Tensor]
LossFn = Callable[[nn.Module, Batch], tuple[Tensor, Tensor]]


def token_nll_sum(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy of logits (B, T, V) against labels (B, T), and the unmasked-token count.

    Computed in fp32: under autocast the logits may be bf16, whose log-softmax loses ~2 digits.
    """
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, (labels != IGNORE_INDEX).sum()


def lm_loss(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """Next-token loss. batch: input_ids (B, T), labels (B, T) already shifted (labels[t] = x[t+1]),
    optional attention_mask. A MoE model's load-balancing loss (model.aux_loss) is added per token,
    so after the loop's division it contributes its coefficient-weighted mean."""
    logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
    loss, n_tokens = token_nll_sum(logits, batch["labels"])
    aux = getattr(_unwrap(model), "aux_loss", None)
    if aux is not None:
        loss = loss + aux * n_tokens
    return loss, n_tokens


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP / torch.compile wrappers (their attributes live on the inner module)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def shift_labels(tokens: Tensor, pad_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(B, T+1) tokens -> inputs (B, T) and labels (B, T), labels = next token, -100 where padded."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:].clone()
    if pad_mask is not None:
        labels[pad_mask[:, 1:]] = IGNORE_INDEX
    return inputs, labels
