"""Sampling as small pure functions: logits -> logits transforms, then one draw.

Every caller (the CLI, evaluation, QA retry, DPO sampling) goes through `sample_next`, so a knob means
the same thing everywhere. Greedy decoding is temperature 0. Filters set removed logits to -inf and
always keep the most likely token, so no filter can leave an empty distribution.

References: top-k (Fan et al. 2018), nucleus/top-p (Holtzman et al. 2020), epsilon sampling (Hewitt et
al. 2022, "Truncation Sampling as Language Model Desmoothing"), min-p (Nguyen et al. 2024), repetition
penalty (Keskar et al. 2019, CTRL).
"""

from __future__ import annotations

import torch

from lmlab.schema.sections import SamplingConfig


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V); seen (B, V) bool marks tokens already in each sequence."""
    if penalty == 1.0:
        return logits
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the highest-probability tokens until their cumulative mass reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cum - sorted_logits.softmax(-1) >= p  # mass *before* this token already reached p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    probs = logits.softmax(-1)
    threshold = min_p * probs.max(-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def epsilon_filter(logits: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Remove tokens with probability below epsilon; the most likely token always survives."""
    probs = logits.softmax(-1)
    drop = probs < epsilon
    drop.scatter_(-1, probs.argmax(-1, keepdim=True), False)
    return logits.masked_fill(drop, float("-inf"))


def transform_logits(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor | None = None) -> torch.Tensor:
    """All configured transforms in the usual order: penalty, temperature, then truncation filters."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.greedy:
        return logits
    logits = logits / cfg.temperature
    if cfg.top_k is not None:
        logits = top_k_filter(logits, cfg.top_k)
    if cfg.top_p is not None:
        logits = top_p_filter(logits, cfg.top_p)
    if cfg.min_p is not None:
        logits = min_p_filter(logits, cfg.min_p)
    if cfg.epsilon is not None:
        logits = epsilon_filter(logits, cfg.epsilon)
    return logits


def sample_next(
    logits: torch.Tensor,
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from the last-position logits (B, V)."""
    logits = transform_logits(logits, cfg, seen)
    if cfg.greedy:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
