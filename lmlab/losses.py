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

from lmlab.checkpoint import unwrap

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


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ W^T, y_i), chunked over rows, with both gradients computed in the forward.

    The (N, vocab) logits are never materialized whole: per chunk, one matmul, one fused log-softmax
    (its exp serves as the gradient softmax - onehot), and two matmuls for the gradients. That
    replaces log_softmax, its backward, the fp32 copy and the zero-filled gradient of the full logits,
    which take about a third of a small model's training step on CPU (large vocabularies).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, compute_dtype: torch.dtype, chunk: int) -> Tensor:
        want_h, want_w = hidden.requires_grad, weight.requires_grad  # e.g. LoRA: the head is frozen
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, h.shape[0], chunk):
            hc, yc = h[start : start + chunk], labels[start : start + chunk]
            logp = torch.log_softmax(hc @ w.T, dim=1, dtype=torch.float32)  # (c, V), one fused pass
            loss -= logp.gather(1, yc[:, None]).sum()
            probs = logp.exp_()  # in place: softmax, then d loss / d logits = softmax - onehot
            probs.scatter_add_(1, yc[:, None], torch.full((yc.shape[0], 1), -1.0, device=probs.device))
            g = probs.to(compute_dtype)
            if want_h:
                grad_h[start : start + chunk] = g @ w
            if want_w:
                grad_w += (g.T @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        gh = (grad_h * grad_out).to(h_dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def linear_cross_entropy(hidden: Tensor, head: nn.Module, labels: Tensor, chunk_elems: int = 1 << 24) -> Tensor:
    """Summed CE of head(hidden) (N, D) -> (N, V) against labels (N,) (no ignored labels here).

    A plain bias-free nn.Linear head under autograd goes through the fused chunked kernel above; any
    other head (LoRA, FSDP-sharded, biased) or no-grad evaluation takes the direct path.
    """
    weight = getattr(head, "weight", None)
    fused = (
        type(head) is nn.Linear and head.bias is None and torch.is_grad_enabled()
        and weight is not None and weight.dim() == 2 and weight.shape[1] == hidden.shape[-1]
    )
    if not fused:
        return F.cross_entropy(head(hidden).float(), labels, reduction="sum")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute = torch.get_autocast_dtype(device_type)
    else:
        compute = weight.dtype
    chunk = max(16, chunk_elems // weight.shape[0])
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, labels, compute, chunk)


def lm_loss(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """Next-token loss. batch: input_ids (B, T), labels (B, T) already shifted (labels[t] = x[t+1]),
    optional attention_mask. The vocabulary projection runs only where labels count (prompt-masked
    and padded positions need no logits). A MoE model's load-balancing loss (model.aux_loss) is added
    per token, so after the loop's division it contributes its coefficient-weighted mean."""
    raw = unwrap(model)
    hidden = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), return_hidden=True)
    keep = batch["labels"] != IGNORE_INDEX
    n_tokens = keep.sum()
    loss = linear_cross_entropy(hidden[keep], raw.output, batch["labels"][keep])
    aux = getattr(raw, "aux_loss", None)
    if aux is not None:
        loss = loss + aux * n_tokens
    return loss, n_tokens


def shift_labels(tokens: Tensor, pad_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(B, T+1) tokens -> inputs (B, T) and labels (B, T), labels = next token, -100 where padded."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:].clone()
    if pad_mask is not None:
        labels[pad_mask[:, 1:]] = IGNORE_INDEX
    return inputs, labels
