"""The native decoder: one readable Llama/GPT-family transformer driven by ModelConfig.

References: Vaswani et al. 2017 (attention), Radford et al. 2019 (GPT-2: LayerNorm, learned positions,
GELU), Touvron et al. 2023 (Llama: RMSNorm, SwiGLU, RoPE), Ainslie et al. 2023 (grouped-query
attention), Shazeer et al. 2017 / Fedus et al. 2021 (mixture of experts, load-balancing loss), Xiao et al.
2023 (attention sinks). Parameter names follow Meta's llama / llama2.c (`tok_embeddings`, `wq wk wv wo`,
`w1 w2 w3`, `attention_norm`, `ffn_norm`, `norm`, `output`) so reference checkpoints load without a key
map. The model returns logits or hidden states; losses live in lmlab/train/losses.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.model.config import ModelConfig
from lmlab.model.kv_cache import KVCache
from lmlab.model.rope import apply_rotary_emb, rope_angles, rope_inv_freq


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


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.dim, config.norm_eps)
    return LayerNorm(config.dim, config.norm_eps, bias=config.norm_bias)


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
        self.dropout = c.dropout

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
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


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x) (Shazeer 2020), or GELU MLP: w2(gelu(w1 x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.swiglu = c.mlp == "swiglu"
        self.approximate = c.gelu_approximate
        self.w1 = nn.Linear(c.dim, c.hidden_dim, bias=c.mlp_bias)
        self.w2 = nn.Linear(c.hidden_dim, c.dim, bias=c.mlp_bias)
        self.w3 = nn.Linear(c.dim, c.hidden_dim, bias=c.mlp_bias) if self.swiglu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x), approximate=self.approximate))


class MoEFeedForward(nn.Module):
    """Top-k routed experts (Mixtral-style softmax over the chosen logits).

    `aux_loss` after a forward is the Switch Transformer load-balancing loss
    n_experts * sum_i(f_i * P_i): f_i the share of routed slots that went to expert i, P_i its mean
    router probability; it is minimal when routing is uniform.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.n_experts_per_tok
        self.router = nn.Linear(config.dim, config.n_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(config) for _ in range(config.n_experts))
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, dim)
        logits = self.router(x).float()  # (N, E)
        top_logits, top_idx = logits.topk(self.top_k, dim=-1)  # (N, k)
        weights = top_logits.softmax(-1).type_as(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = (top_idx == e).nonzero(as_tuple=True)
            if token.numel():
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        n_experts = len(self.experts)
        frac = F.one_hot(top_idx, n_experts).float().sum((0, 1)) / top_idx.numel()
        self.aux_loss = n_experts * (frac * logits.softmax(-1).mean(0)).sum()
        return out.view(shape)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attention_norm = make_norm(config)
        self.attention = Attention(config, layer)
        self.ffn_norm = make_norm(config)
        self.feed_forward = MoEFeedForward(config) if config.n_experts else FeedForward(config)
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.attention_norm(x), ctx))
        return x + self.dropout(self.feed_forward(self.ffn_norm(x)))


class Transformer(nn.Module):
    """Token ids (B, T) -> logits (B, T, vocab) or final hidden states (B, T, dim)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = c = config
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.dim)
        self.pos_embeddings = nn.Embedding(c.max_seq_len, c.dim) if c.pos == "learned" else None
        self.dropout = nn.Dropout(c.dropout) if c.dropout else nn.Identity()
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.n_layers))
        self.norm = make_norm(c)
        self.output = nn.Linear(c.dim, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if c.pos == "rope":
            inv = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling, c.rope_scaling_factor)
            self.register_buffer("rope_inv_freq", inv.float(), persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2L)
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the MoE load-balancing losses of the last forward, times its coefficient; None if dense."""
        losses = [b.feed_forward.aux_loss for b in self.layers if isinstance(b.feed_forward, MoEFeedForward)]
        losses = [x for x in losses if x is not None]
        return self.config.moe_aux_loss_coef * torch.stack(losses).sum() if losses else None

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_embeddings.weight.numel()
            if self.pos_embeddings is not None:
                n -= self.pos_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (PaLM appendix B, as nanoGPT): per matmul weight 2 forward + 2 backward
        to the inputs, + 2 for its own gradient only if it trains (6N in full training; a LoRA-frozen base
        costs 4N), plus attention 12*L*H*D*T. Embedding lookups are free unless tied to the output."""
        c = self.config
        lookups = {id(e.weight) for e in (self.tok_embeddings, self.pos_embeddings) if e is not None}
        if c.tie_embeddings:
            lookups.discard(id(self.tok_embeddings.weight))
        weights = [p for p in self.parameters() if id(p) not in lookups]
        n, trained = sum(p.numel() for p in weights), sum(p.numel() for p in weights if p.requires_grad)
        return 4 * n + 2 * trained + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len

    def forward(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        return_hidden: bool = False,
        last_only: bool = False,
    ) -> torch.Tensor:
        """tokens (B, T); attention_mask (B, T), 1 = real token, 0 = padding (of these tokens only).

        With a cache, the tokens continue the cached sequence. `last_only` computes logits for the
        last position only (generation). Returns logits (B, T|1, V), or hidden states with return_hidden.
        """
        B, T = tokens.shape
        mask = attention_mask.bool() if attention_mask is not None else None
        if cache is not None:
            ctx, positions = self._cached_context(cache, mask, B, T, tokens.device)
        else:
            ctx, positions = self._full_context(mask, B, T, tokens.device)
        x = self.tok_embeddings(tokens)
        if self.pos_embeddings is not None:
            if int(positions.max()) >= self.config.max_seq_len:
                raise ValueError(
                    f"position {int(positions.max())} is past the learned position table "
                    f"(max_seq_len={self.config.max_seq_len})"
                )
            x = x + self.pos_embeddings(positions)
        x = self.dropout(x)
        for block in self.layers:
            x = block(x, ctx)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        return x if return_hidden else self.output(x)

    def _angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        if self.config.pos != "rope":
            return None, None
        c = self.config
        cos, sin = rope_angles(positions, self.rope_inv_freq, c.rope_scaling, c.rope_scaling_factor)
        return cos.unsqueeze(-2), sin.unsqueeze(-2)  # (B|1, T, 1, D/2)

    def _full_context(
        self, mask: torch.Tensor | None, B: int, T: int, device: torch.device
    ) -> tuple[AttnContext, torch.Tensor]:
        """Training / scoring: every token attends to earlier ones (and the sinks/window rule)."""
        if mask is None:
            positions = torch.arange(T, device=device)[None]  # (1, T)
        else:
            positions = (mask.long().cumsum(1) - 1).clamp_min(0)  # left padding starts at 0
        cos, sin = self._angles(positions)
        if mask is None and self.config.window is None:
            return AttnContext(cos, sin, None, is_causal=True), positions
        idx = torch.arange(T, device=device)
        attn = self._allowed(idx[:, None], idx[None, :], positions[..., :, None], positions[..., None, :])
        if mask is not None:
            attn = attn & mask[:, None, :]
        attn = attn | torch.eye(T, dtype=torch.bool, device=device)  # padded rows: no all-False row
        return AttnContext(cos, sin, attn[:, None], is_causal=False), positions

    def _allowed(self, q_slot, k_slot, q_pos, k_pos) -> torch.Tensor:
        """Causal in slot order, plus the sliding window (by position) with sinks always visible."""
        allowed = k_slot <= q_slot
        c = self.config
        if c.window is not None:
            allowed = allowed & ((q_pos - k_pos < c.window) | (k_pos < c.sink_tokens))
        return allowed

    def _cached_context(
        self, cache: KVCache, mask: torch.Tensor | None, B: int, T: int, device: torch.device
    ) -> tuple[AttnContext, torch.Tensor]:
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=device)
        start, positions = cache.begin(mask)
        S = start + T
        if cache.streaming:  # StreamingLLM: RoPE positions are cache slots
            slots = torch.arange(S, device=device)[None]
            cos, sin = self._angles(slots[:, start:])
            key_cos, key_sin = self._angles(slots)
        else:
            cos, sin = self._angles(positions)
            key_cos = key_sin = None
        ctx = AttnContext(cos, sin, None, is_causal=False, cache=cache, start=start, key_cos=key_cos, key_sin=key_sin)
        window = self.config.window
        simple = not cache.has_padding and (window is None or S <= window)
        if simple and T == 1:
            return ctx, positions  # one new token sees every cached slot
        if simple and start == 0:
            ctx.is_causal = True
            return ctx, positions
        q_slot = torch.arange(start, S, device=device)
        k_slot = torch.arange(S, device=device)
        if cache.streaming:  # distances are measured in slots, as RoPE sees them
            q_pos, k_pos = q_slot[None, :, None], k_slot[None, None, :]
        else:
            q_pos, k_pos = positions[:, :, None], cache.slot_pos[:, None, :S]
        attn = self._allowed(q_slot[:, None], k_slot[None, :], q_pos, k_pos)
        attn = attn & cache.key_mask[:, None, :S]
        attn[:, torch.arange(T, device=device), q_slot] = True  # padded rows: no all-False row
        ctx.mask = attn[:, None]
        return ctx, positions


def unwrap(model: nn.Module) -> nn.Module:
    """The raw Transformer under torch.compile / DDP / FSDP wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            return model
        model = inner
