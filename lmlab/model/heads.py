"""Sequence heads on the decoder: a scalar or class head reading the last real (or mean) hidden state, and
a scalar head that gives a value at every position (Cobbe et al. 2021, "Training Verifiers to Solve Math
Word Problems": the token-level verifier).

One class serves classification (n_labels classes) and reward models (n_labels=1, no bias: TRL's
num_labels=1 sequence-classification model; a bias cancels in every Bradley-Terry difference); `ScalarHead`
is its one-output form with per-token values, for the GSM8K verifier.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmlab.errors import ConfigError


def pool(hidden: Tensor, mask: Tensor, mode: str) -> Tensor:
    """(B, T, D) -> (B, D): the last real token (either padding side) or the mean over real tokens."""
    if mode == "last":
        last = mask.long().cumsum(1).argmax(1)  # first slot reaching the final count = last real token
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    if mode == "mean":
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    raise ConfigError(f"classify.pooling={mode!r}: expected last or mean")


class SequenceClassifier(nn.Module):
    """backbone (a Transformer) + dropout + linear head; returns class logits (B, C) (a reward: (B, 1))."""

    def __init__(self, backbone: nn.Module, n_labels: int, dropout: float = 0.3, pooling: str = "last",
                 bias: bool = True) -> None:
        super().__init__()
        pool(torch.zeros(1, 1, 1), torch.ones(1, 1), pooling)  # reject a bad mode now, not mid-run
        self.backbone = backbone
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.config.dim, n_labels, bias=bias)
        # zero at start: uniform predictions, loss ln(C), and no gradient into the backbone until the head has
        # learned a direction. A randomly initialized head on final-norm states (norms in the tens for
        # SmolLM2) starts with large confident logits whose gradients scramble the backbone in the first
        # steps (measured: CFIMDB train loss above ln 2 for 30 steps, dev 0.73 after one epoch).
        nn.init.zeros_(self.head.weight)
        if bias:
            nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                lengths: Tensor | None = None) -> Tensor:
        """`lengths` (B,) instead of a mask says the rows are right-padded: a causal backbone then needs no
        mask (no real token sees the padding), and pooling reads the rows' first `lengths` tokens."""
        if lengths is not None:
            hidden = self.backbone(input_ids, return_hidden=True)  # (B, T, D)
            attention_mask = torch.arange(input_ids.shape[1], device=input_ids.device)[None] < lengths[:, None]
        else:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            hidden = self.backbone(input_ids, attention_mask=attention_mask, return_hidden=True)
        return self.head(self.dropout(pool(hidden, attention_mask, self.pooling)))


class ScalarHead(SequenceClassifier):
    """backbone + one zero-initialized output: a score (B,) of the pooled state, or with `per_token` a value
    (B, T) at every position, each reading the tokens up to it. The linear map is the same either way, so
    the pooled `last` score equals the per-token value at the last real token: a token-level verifier is
    trained per token and ranks solutions by its last value."""

    def __init__(self, backbone: nn.Module, per_token: bool = False, dropout: float = 0.0, pooling: str = "last") -> None:
        super().__init__(backbone, 1, dropout, pooling)
        self.per_token = per_token

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, *, per_token: bool | None = None,
                return_hidden: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Scores (B,) or values (B, T) (`per_token` overrides the module's setting for this call); with
        return_hidden also the final hidden states (B, T, D), e.g. for a joint language-modelling loss."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.backbone(input_ids, attention_mask=attention_mask, return_hidden=True)  # (B, T, D)
        every = self.per_token if per_token is None else per_token
        x = hidden if every else pool(hidden, attention_mask, self.pooling)
        values = self.head(self.dropout(x)).squeeze(-1).float()
        return (values, hidden) if return_hidden else values
