"""AdamW: lmlab's own (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization", Algorithm 2)
plus the parameter-group rule (what decays) and a selector for torch's kernels.

Decoupled decay means the weights shrink by lr * wd directly, instead of adding wd * theta to the
gradient (which Adam would then rescale per coordinate, weakening decay where gradients are large).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from lmlab.errors import ConfigError


class AdamW(torch.optim.Optimizer):
    """AdamW with bias correction; same update and state names as torch.optim.AdamW (exp_avg, ...)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise ConfigError(f"AdamW: invalid lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"].item()
                m, v, g = state["exp_avg"], state["exp_avg_sq"], p.grad
                p.mul_(1 - lr * wd)  # decoupled weight decay (Algorithm 2, line 12)
                m.lerp_(g, 1 - beta1)  # m = b1 m + (1 - b1) g
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # v = b2 v + (1 - b2) g^2
                # bias correction folded into the step size and the denominator, as torch does
                bias1, bias2 = 1 - beta1**t, 1 - beta2**t
                denom = (v.sqrt() / math.sqrt(bias2)).add_(eps)
                p.addcdiv_(m, denom, value=-lr / bias1)
        return loss


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """Two groups: matrices decay; norms, biases (any 1-d tensor) and, unless asked, embeddings do not.

    Embeddings are looked up, not multiplied, so decay only pulls rare tokens' rows to zero. Tied
    output/embedding weights appear once (named_parameters de-duplicates), in the embedding's group.
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or (id(p) in embedding_ids and not decay_embeddings)
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module,
    impl: str = "lmlab",
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    decay_embeddings: bool = False,
) -> torch.optim.Optimizer:
    """AdamW over `param_groups(model)`: impl lmlab | torch | torch-foreach | torch-fused."""
    return make_adamw(param_groups(model, weight_decay, decay_embeddings), impl, lr, betas, eps)


def make_adamw(groups: list[dict], impl: str, lr: float, betas: tuple[float, float], eps: float) -> torch.optim.Optimizer:
    """The one place an `optim.impl` name becomes an optimizer (every recipe kind goes through here)."""
    kwargs = dict(lr=lr, betas=tuple(betas), eps=eps)
    if impl == "lmlab":
        return AdamW(groups, **kwargs)
    extra = {"torch": {}, "torch-foreach": {"foreach": True}, "torch-fused": {"fused": True}}
    if impl not in extra:
        raise ConfigError(f"optim.impl={impl!r}: expected one of ['lmlab', *{sorted(extra)}]")
    return torch.optim.AdamW(groups, **kwargs, **extra[impl])
