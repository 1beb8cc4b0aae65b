"""Objectives: pure functions `(model, batch) -> LossOutput` (torchtune `rlhf/loss` style).

An objective returns a *sum* and the *count* of what it sums over (target tokens for language modelling,
examples for classification, pairs for preference losses), the input tokens it processed (throughput,
MFU) and its own metrics as sums over the same units. The loop adds sums and counts over micro-batches
and processes and divides once: every counted unit weighs the same however the micro-batches are padded
or masked (a per-micro-batch mean would not: nanoGPT issue 168). It logs `loss`, each metric as
sum / count, and perplexity only when the objective says its loss is a per-token NLL. Labels equal to
IGNORE_INDEX (-100) mark padding and prompt tokens. The preference objectives (DPO, reward models) live
in lmlab/train/preference.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

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
_CASTS = WeakIdKeyDictionary()  # frozen weight -> (its key, its copy in the matmul dtype); see _compute_weight


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


def _compute_weight(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """`weight` in the matmul dtype. A frozen weight in another dtype (LoRA's tied fp32 head under bf16
    autocast) is cast once and the copy reused while the weight's storage and version are unchanged: the
    cast of SmolLM2's 28M-element head cost ~19 ms of every step. A weight that trains is cast afresh."""
    if weight.dtype == dtype or weight.requires_grad:
        return weight.to(dtype)
    key = (dtype, weight.data_ptr(), weight._version, weight.shape)
    cached = _CASTS.get(weight)
    if cached is None or cached[0] != key:
        cached = _CASTS[weight] = (key, weight.detach().to(dtype))
    return cached[1]


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
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, compute_dtype: torch.dtype, chunk: int,
                per_row: bool = False) -> Tensor:
        want_h, want_w = hidden.requires_grad, weight.requires_grad  # e.g. LoRA: the head is frozen
        if per_row and want_w:
            raise ValueError("per-row cross-entropy needs a frozen weight (its gradient is a per-row weighted sum)")
        h, w = hidden.to(compute_dtype), _compute_weight(weight, compute_dtype)
        n, vocab = h.shape[0], w.shape[0]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = None
        loss = torch.zeros(n if per_row else (), dtype=torch.float32, device=hidden.device)
        rows = max(1, (1 << 20) // vocab)  # rows per elementwise slice: ~4 MB of fp32
        minus_one = torch.full((rows, 1), -1.0, device=hidden.device)
        for start in range(0, n, chunk):
            hc, yc = h[start : start + chunk], labels[start : start + chunk]
            g = torch.mm(hc, w.T, out=_workspace(hc.shape[0], vocab, h.dtype, h.device))  # (c, V) logits,
            # overwritten below by their gradient
            for r in range(0, g.shape[0], rows):
                y = yc[r : r + rows, None]
                logp = torch.log_softmax(g[r : r + rows], dim=1, dtype=torch.float32)
                if per_row:
                    loss[start + r : start + r + y.shape[0]] = -logp.gather(1, y).squeeze(1)
                else:
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
        ctx.dtypes, ctx.per_row = (hidden.dtype, weight.dtype), per_row
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        if ctx.per_row:  # each row's loss has its own upstream gradient (e.g. a DPO pair's weight)
            gh = (grad_h * grad_out[:, None].to(grad_h.dtype)).to(h_dtype) if grad_h is not None else None
            return gh, None, None, None, None, None
        # the trainer backpropagates the summed loss itself: skip two passes of multiplying by 1
        one = grad_out.device.type == "cpu" and float(grad_out) == 1.0
        gh = gw = None
        if grad_h is not None:
            gh = grad_h.to(h_dtype) if one else (grad_h * grad_out).to(h_dtype)
        if grad_w is not None:
            gw = grad_w.to(w_dtype)
            if not one:
                gw = gw * grad_out if gw is grad_w else gw.mul_(grad_out)  # never scale the saved tensor
        return gh, gw, None, None, None, None


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


def linear_token_logprobs(hidden: Tensor, head: nn.Module, targets: Tensor, chunk_elems: int = 1 << 27) -> Tensor:
    """log p(targets[i] | hidden[i]) under head (N, D) -> (N,) in fp32: per-token log-probs for objectives
    that weigh sequences differently (DPO sums them per sequence). A frozen plain head (LoRA, a reference
    model) goes through the fused kernel with no logits kept, with or without autograd; a head that trains
    takes the direct path (its gradient would need every row's logits gradient kept)."""
    weight = getattr(head, "weight", None)
    fused = (type(head) is nn.Linear and head.bias is None and weight is not None and not weight.requires_grad
             and weight.dim() == 2 and weight.shape[1] == hidden.shape[-1])
    if not fused:
        return -F.cross_entropy(head(hidden).float(), targets, reduction="none")
    device_type = hidden.device.type
    compute = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    chunk = max(16, chunk_elems // weight.shape[0])
    with torch.autocast(device_type, enabled=False):
        return -_LinearCrossEntropy.apply(hidden, weight, targets, compute, chunk, True)


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


def verifier_loss(model: nn.Module, batch: Batch, lm_coef: float = 0.0) -> LossOutput:
    """Cobbe et al. 2021's verifier objective: binary cross-entropy of a ScalarHead's value at every
    counted position (`value_mask` (B, T): each solution token for the token-level verifier, the last one
    for a solution-level one) against the solution's label (`labels` (B,), 1 = final answer right), summed
    over those positions, which are the count. With `lm_coef` the language-modelling loss on the solution
    tokens (`lm_labels` (B, T), -100 elsewhere, weighted by `lm_weight`: 1 per token, or 1/n per token
    of an n-token solution so that it counts once like its value) is added, the joint objective of the
    paper. Metrics: `accuracy` (the value's sign agrees with the label), `value_loss`, `lm_loss`."""
    mask = batch["value_mask"]
    values, hidden = model(batch["input_ids"], batch["attention_mask"], per_token=True, return_hidden=True)
    target = batch["labels"].float()[:, None].expand_as(values)[mask]
    picked = values[mask]
    value_loss = F.binary_cross_entropy_with_logits(picked, target, reduction="sum")
    loss, metrics = value_loss, {"value_loss": value_loss.detach()}
    if lm_coef:
        lm_labels = batch["lm_labels"]
        keep = lm_labels != IGNORE_INDEX
        output = unwrap(model).backbone.output
        weight = batch["lm_weight"][keep]
        if bool((weight == 1).all()):
            lm = linear_cross_entropy(hidden[keep], output, lm_labels[keep])
        else:
            nll = F.cross_entropy(output(hidden[keep]).float(), lm_labels[keep], reduction="none")
            lm = (nll * weight).sum()
        loss = loss + lm_coef * lm
        metrics["lm_loss"] = lm.detach()
    metrics["accuracy"] = ((picked.detach() > 0) == (target > 0.5)).sum()
    return LossOutput(loss, mask.sum(), int(batch["attention_mask"].sum()), metrics)
