"""Objectives: pure functions `(model, batch) -> LossOutput` (torchtune `rlhf/loss` style).

An objective returns a *sum* and the *count* of what it sums over (target tokens for language modelling,
examples for classification, pairs for preference losses), the input tokens it processed (throughput,
MFU) and its own metrics as sums over the same units. The loop adds sums and counts over micro-batches
and processes and divides once: every counted unit weighs the same however the micro-batches are padded
or masked (a per-micro-batch mean would not: nanoGPT issue 168). It logs `loss`, each metric as
sum / count, and perplexity only when the objective says its loss is a per-token NLL. Labels equal to
IGNORE_INDEX (-100) mark padding and prompt tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.data.batch import IGNORE_INDEX, Batch
from lmlab.model.transformer import unwrap


@dataclass
class LossOutput:
    """One micro-batch's contribution to a step."""

    loss: Tensor
    """Summed over `count` units; backpropagated as is (the loop divides the gradients once)."""
    count: Tensor | int
    """Units the loss sums over: target tokens, examples, pairs."""
    tokens: int
    """Input tokens processed (throughput and MFU count these)."""
    metrics: dict[str, Tensor] = field(default_factory=dict)
    """Objective-specific sums over the same units (logged as sum / count), e.g. rewards/accuracies."""
    perplexity: bool = False
    """The loss is a token NLL: the loop also logs ppl = exp(loss)."""


Objective = Callable[[nn.Module, Batch], LossOutput]


_WORKSPACE: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def _workspace(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A reused (rows, cols) scratch matrix. A fresh logits-sized tensor every step is hundreds of MB
    that the allocator returns to the OS and page-faults back in (on CPU that alone made the logits
    matmul ~20% slower); the fused loss uses it only inside its own forward, so one per dtype suffices.
    It lives as long as the process (at most 2^27 logits: 256 MB in bf16)."""
    key = (device, dtype)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < rows * cols:
        _WORKSPACE.pop(key, None)
        buf = _WORKSPACE[key] = torch.empty(rows * cols, dtype=dtype, device=device)
    return buf[: rows * cols].view(rows, cols)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ W^T, y_i) with both gradients computed in the forward.

    The logits are computed by one matmul into a (rows, vocab) buffer in the compute dtype, which is
    then overwritten in place by d loss / d logits = softmax - onehot, a few rows at a time: each
    slice's fp32 log-softmax fits in cache (on CPU that runs the elementwise work about 3x faster
    than one pass over the whole matrix). Two more matmuls give both gradients. Nothing of vocab
    size is ever held in fp32, and no separate logits gradient is materialized. Past `chunk` rows the
    work is split and the weight gradient accumulated in fp32, to bound memory.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, compute_dtype: torch.dtype, chunk: int) -> Tensor:
        want_h, want_w = hidden.requires_grad, weight.requires_grad  # e.g. LoRA: the head is frozen
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        n, vocab = h.shape[0], w.shape[0]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = max(1, (1 << 20) // vocab)  # rows per elementwise slice: ~4 MB of fp32
        minus_one = torch.full((rows, 1), -1.0, device=hidden.device)
        for start in range(0, n, chunk):
            hc, yc = h[start : start + chunk], labels[start : start + chunk]
            g = torch.mm(hc, w.T, out=_workspace(hc.shape[0], vocab, h.dtype, h.device))  # (c, V) logits,
            # overwritten below by their gradient
            for r in range(0, g.shape[0], rows):
                y = yc[r : r + rows, None]
                logp = torch.log_softmax(g[r : r + rows], dim=1, dtype=torch.float32)
                loss -= logp.gather(1, y).sum()
                probs = logp.exp_()  # softmax
                probs.scatter_add_(1, y, minus_one[: y.shape[0]])  # - onehot
                g[r : r + rows] = probs
            if want_h:
                grad_h[start : start + chunk] = g @ w
            if want_w:
                if n <= chunk:
                    grad_w = g.T @ hc  # one matmul, rounded once (as autograd would)
                else:
                    if grad_w is None:
                        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                    grad_w += (g.T @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        # the trainer backpropagates the summed loss itself: skip two passes of multiplying by 1
        one = grad_out.device.type == "cpu" and float(grad_out) == 1.0
        gh = gw = None
        if grad_h is not None:
            gh = grad_h.to(h_dtype) if one else (grad_h * grad_out).to(h_dtype)
        if grad_w is not None:
            gw = grad_w.to(w_dtype)
            if not one:
                gw = gw * grad_out if gw is grad_w else gw.mul_(grad_out)  # never scale the saved tensor
        return gh, gw, None, None, None


def linear_cross_entropy(hidden: Tensor, head: nn.Module, labels: Tensor, chunk_elems: int = 1 << 27) -> Tensor:
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


def lm_loss(model: nn.Module, batch: Batch) -> LossOutput:
    """Next-token loss. batch: input_ids (B, T), labels (B, T) already shifted (labels[t] = x[t+1]),
    optional attention_mask. The vocabulary projection runs only where labels count (prompt-masked
    and padded positions need no logits). A MoE model's load-balancing loss (model.aux_loss) is added
    per token, so after the loop's division it contributes its coefficient-weighted mean."""
    raw = unwrap(model)
    hidden = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), return_hidden=True)
    labels = batch["labels"]
    keep = labels != IGNORE_INDEX
    n_tokens = keep.sum()
    if int(n_tokens) == labels.numel():  # pretraining: every position counts, no gather needed
        loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), raw.output, labels.reshape(-1))
    else:
        loss = linear_cross_entropy(hidden[keep], raw.output, labels[keep])
    aux = getattr(raw, "aux_loss", None)
    if aux is not None:
        loss = loss + aux * n_tokens
    return LossOutput(loss, n_tokens, batch["input_ids"].numel(), perplexity=True)


def shift_labels(tokens: Tensor, pad_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(B, T+1) tokens -> inputs (B, T) and labels (B, T), labels = next token, -100 where padded."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:].clone()
    if pad_mask is not None:
        labels[pad_mask[:, 1:]] = IGNORE_INDEX
    return inputs, labels


def classification_loss(model: nn.Module, batch: Batch) -> LossOutput:
    """Summed cross-entropy over the batch and the number of examples (the loop divides once), with the
    training accuracy. Labels equal to IGNORE_INDEX count for nothing (a filler example in an otherwise
    empty micro-batch)."""
    logits = model(batch["input_ids"], batch["attention_mask"])
    labels = batch["labels"]
    loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    keep = labels != IGNORE_INDEX
    correct = ((logits.detach().argmax(-1) == labels) & keep).sum()
    return LossOutput(loss, keep.sum(), int(batch["attention_mask"].sum()), {"accuracy": correct})
