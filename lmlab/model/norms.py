"""Normalisation layers computed in fp32 that write the next matmul's dtype directly: RMSNorm (Zhang &
Sennrich 2019) and LayerNorm (Ba et al. 2016)."""

from __future__ import annotations

import torch
import torch.nn as nn

from lmlab.model.config import ModelConfig


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the next matmul runs in: autocast's when it is on (so a norm writes it directly and
    autocast has nothing left to cast), else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype



class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * g (Zhang & Sennrich 2019), computed in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(compute_dtype(x))



class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * g + b (Ba et al. 2016), computed in fp32."""

    def __init__(self, dim: int, eps: float, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        mean = xf.mean(-1, keepdim=True)
        var = (xf - mean).pow(2).mean(-1, keepdim=True)
        y = (xf - mean) * torch.rsqrt(var + self.eps) * self.weight.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(compute_dtype(x))



def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    """The config's norm over `dim` features (default the residual width).

    Gemma's checkpoints scale by (1 + weight); lmlab stores that sum as the weight itself (so does
    llama.cpp's GGUF), which keeps one norm for every family: lmlab/weights/hf.py adds and subtracts
    the 1 at the Hugging Face boundary."""
    dim = config.dim if dim is None else dim
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    return LayerNorm(dim, config.norm_eps, bias=config.norm_bias)
