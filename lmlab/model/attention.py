"""Causal self-attention (Vaswani et al. 2017) with grouped-query heads (Ainslie et al. 2023), RoPE, a
KV cache, padding, sliding-window and attention-sink masks.

Fast paths (each tested equal to the plain SDPA call): on CPU, small score matrices take three plain
kernels (`use_math_attention`: one baddbmm with the additive mask, an fp32 softmax, one bmm; causal
queries in blocks that skip masked keys), and a one-query decode step two small matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.model.config import ModelConfig
from lmlab.model.kv_cache import KVCache
from lmlab.model.norms import RMSNorm, compute_dtype
from lmlab.model.rope import apply_rotary_emb


@dataclass
class AttnContext:
    """What every layer's attention needs for one forward, computed once in Transformer.forward."""

    cos: torch.Tensor | None  # (B|1, T, 1, D/2) angles of the new tokens (None without RoPE)
    sin: torch.Tensor | None
    mask: torch.Tensor | None  # (B|1, 1, T, S) bool, True = may attend; None with is_causal or no mask
    is_causal: bool
    cache: KVCache | None = None
    start: int = 0  # first cache slot of the new tokens
    key_cos: torch.Tensor | None = None  # streaming cache: keys are rotated by slot index at read time
    key_sin: torch.Tensor | None = None
    _bias: dict = field(default_factory=dict)  # additive masks by (dtype, T, S), built once per forward

    def additive_mask(self, T: int, S: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The mask as 0 / -inf to add to scores: (1, T, S) when causal, else (B|1, 1, T, S)."""
        key = (dtype, T, S)
        if key not in self._bias:
            if self.mask is not None:
                allowed = self.mask
            elif self.is_causal:
                allowed = torch.ones(T, S, dtype=torch.bool, device=device).tril()[None]  # top-left aligned, as SDPA
            else:
                allowed = torch.ones(1, T, S, dtype=torch.bool, device=device)
            self._bias[key] = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))
        return self._bias[key]



# Above this many attention scores per layer (batch x heads x queries x keys) the math path's
# saved probabilities cost more memory than its speed is worth; SDPA's fused kernel keeps O(T) state.
MATH_ATTENTION_MAX_SCORES = 1 << 23



def use_math_attention(q: torch.Tensor, k: torch.Tensor) -> bool:
    """On CPU, PyTorch's fused SDPA kernel runs 2.3x (bf16) to 2.8x (fp32) slower than three plain
    kernels at training shapes (B 8, H 6, T 256, D 48; measured with torch 2.13), so small score
    matrices take the math path there. CUDA keeps SDPA (flash / memory-efficient kernels)."""
    B, H, T, _ = q.shape
    return q.device.type == "cpu" and T > 1 and B * H * T * k.shape[2] <= MATH_ATTENTION_MAX_SCORES



class Attention(nn.Module):
    """Multi-head / grouped-query / multi-query self-attention over PyTorch SDPA."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        c = config
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.wq = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=c.qkv_bias)
        self.wk = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.wv = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.wo = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=c.out_bias)
        self.q_norm = RMSNorm(c.head_dim, c.norm_eps) if c.qk_norm else None  # per head, before RoPE
        self.k_norm = RMSNorm(c.head_dim, c.norm_eps) if c.qk_norm else None
        self.wqkv: nn.Module | None = None  # wq|wk|wv in one matmul, set for inference by quantize.fuse_projections
        self.dropout = c.dropout

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        B, T, _ = x.shape
        if self.wqkv is not None:
            q, k, v = self.wqkv(x).split([self.n_heads * self.head_dim] + [self.n_kv_heads * self.head_dim] * 2, -1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if ctx.cos is not None:
            q = apply_rotary_emb(q, ctx.cos, ctx.sin)
            if ctx.key_cos is None:  # keys carry their true position
                k = apply_rotary_emb(k, ctx.cos, ctx.sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer, ctx.start, k, v)  # (B, Hkv, S, D)
            if ctx.key_cos is not None:
                k = apply_rotary_emb(k.transpose(1, 2), ctx.key_cos, ctx.key_sin).transpose(1, 2)
            q = q.to(k.dtype)  # the cache may hold a wider dtype than the weights (see generate.py)
        if T == 1 and ctx.cache is not None:
            y = self._decode_attention(q, k, v, ctx.mask).to(compute_dtype(x))
            return self.wo(y.reshape(B, 1, self.n_heads * self.head_dim))
        dropout = self.dropout if self.training else 0.0
        if use_math_attention(q, k):
            y = self._math_attention(q, k, v, ctx, dropout)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=ctx.mask, is_causal=ctx.is_causal, dropout_p=dropout,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim).to(compute_dtype(x)))

    def _math_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext, dropout: float) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + mask) v as three kernels: scores and mask in one baddbmm, an fp32
        softmax (as the reference eager implementations), one bmm. See use_math_attention for when."""
        B, H, T, D = q.shape
        S = k.shape[2]
        if self.n_kv_heads != H:  # GQA: each kv head serves H / Hkv query heads
            g = H // self.n_kv_heads
            k = k[:, :, None].expand(B, self.n_kv_heads, g, S, D).reshape(B, H, S, D)
            v = v[:, :, None].expand(B, self.n_kv_heads, g, S, D).reshape(B, H, S, D)
        bias = ctx.additive_mask(T, S, q.dtype, q.device)  # (1, T, S) causal, or (B|1, 1, T, S)
        qs = (q * D**-0.5).reshape(B * H, T, D)
        kt = k.reshape(B * H, S, D).transpose(1, 2)
        vs = v.reshape(B * H, S, D)

        def attend(scores: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
            if dropout:
                probs = F.dropout(probs, dropout, training=True)
            return probs @ values

        if bias.dim() == 4:
            return attend(torch.bmm(qs, kt).view(B, H, T, S) + bias, v)
        if ctx.mask is None and ctx.is_causal and T == S and T >= 256:
            # causal: query block i needs keys up to its own end only; T/128 blocks skip ~1/4 to 3/8
            # of the scores (all of them -inf) at the cost of a few more kernel calls
            blocks = min(4, T // 128)
            ends = [T * (i + 1) // blocks for i in range(blocks)]
            starts = [0] + ends[:-1]
            out = [attend(torch.baddbmm(bias[:, a:e, :e], qs[:, a:e], kt[:, :, :e]), vs[:, :e])
                   for a, e in zip(starts, ends)]
            return torch.cat(out, dim=1).view(B, H, T, D)
        return attend(torch.baddbmm(bias, qs, kt), vs).view(B, H, T, D)


    def _decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """One query per row against the cache: two small matmuls beat SDPA's kernel launch here."""
        B, S = q.shape[0], k.shape[2]
        g = self.n_heads // self.n_kv_heads
        q = q.view(B, self.n_kv_heads, g, self.head_dim)  # (B, Hkv, G, D): query heads of one kv head
        scores = (q @ k.transpose(-1, -2)).float() * self.head_dim**-0.5  # (B, Hkv, G, S)
        if mask is not None:
            scores = scores.masked_fill(~mask.view(B, 1, 1, S), float("-inf"))
        return scores.softmax(-1).type_as(v) @ v  # (B, Hkv, G, D)
