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

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.model.attention import Attention, AttnContext
from lmlab.model.config import ModelConfig
from lmlab.model.kv_cache import KVCache
from lmlab.model.norms import make_norm
from lmlab.model.rope import rope_angles, rope_inv_freq


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x) (Shazeer 2020), GeGLU: w2(gelu(w1 x) * w3 x), or GELU MLP: w2(gelu(w1 x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.swiglu = c.mlp == "swiglu"
        self.geglu = c.mlp == "geglu"
        self.approximate = c.gelu_approximate
        self.w1 = nn.Linear(c.dim, c.hidden_dim, bias=c.mlp_bias)
        self.w2 = nn.Linear(c.hidden_dim, c.dim, bias=c.mlp_bias)
        self.w3 = nn.Linear(c.dim, c.hidden_dim, bias=c.mlp_bias) if self.swiglu or self.geglu else None
        self.w13: nn.Module | None = None  # w1|w3 in one matmul, set for inference by quantize.fuse_projections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, -1)
            gate = F.silu(gate) if self.swiglu else F.gelu(gate, approximate=self.approximate)
            return self.w2(gate * up)
        if self.swiglu:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        if self.geglu:
            return self.w2(F.gelu(self.w1(x), approximate=self.approximate) * self.w3(x))
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
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x)); with post_norms (Gemma 2/3)
    each branch output is normalised too: x + norm(attn(norm(x)))."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attention_norm = make_norm(config)
        self.attention = Attention(config, layer)
        self.ffn_norm = make_norm(config)
        self.feed_forward = MoEFeedForward(config) if config.n_experts else FeedForward(config)
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.post_attention_norm = make_norm(config) if config.post_norms else None
        self.post_ffn_norm = make_norm(config) if config.post_norms else None

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        if self.post_attention_norm is not None:
            x = x + self.dropout(self.post_attention_norm(self.attention(self.attention_norm(x), ctx)))
            return x + self.dropout(self.post_ffn_norm(self.feed_forward(self.ffn_norm(x))))
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
            if c.global_every:  # the windowed layers' own base, unscaled (Gemma 3)
                local = rope_inv_freq(c.head_dim, c.rope_local_theta)
                self.register_buffer("rope_local_inv_freq", local.float(), persistent=False)
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
    def device(self) -> torch.device:
        """Where the model lives (the embedding table may be a quantized module with no `weight`)."""
        return self.norm.weight.device

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
        if self.config.scale_embeddings:
            x = x * torch.tensor(self.config.dim**0.5, dtype=x.dtype)
        if self.pos_embeddings is not None:
            if int(positions.max()) >= self.config.max_seq_len:
                raise ValueError(
                    f"position {int(positions.max())} is past the learned position table "
                    f"(max_seq_len={self.config.max_seq_len})"
                )
            x = x + self.pos_embeddings(positions)
        x = self.dropout(x)
        if self.config.global_every:  # local layers: the window and their own RoPE base
            local = self._local_context(ctx, mask, positions, T, tokens.device)
            for i, block in enumerate(self.layers):
                x = block(x, local if self.config.is_local(i) else ctx)
        else:
            for block in self.layers:
                x = block(x, ctx)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        return x if return_hidden else self.output(x)

    def _angles(self, positions: torch.Tensor, local: bool = False) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        if self.config.pos != "rope":
            return None, None
        c = self.config
        if local:
            cos, sin = rope_angles(positions, self.rope_local_inv_freq)
        else:
            cos, sin = rope_angles(positions, self.rope_inv_freq, c.rope_scaling, c.rope_scaling_factor)
        return cos.unsqueeze(-2), sin.unsqueeze(-2)  # (B|1, T, 1, D/2)

    def _window(self, local: bool) -> int | None:
        """The window of a layer: with global_every only the local layers have one."""
        return self.config.window if local or not self.config.global_every else None

    def _full_context(
        self, mask: torch.Tensor | None, B: int, T: int, device: torch.device
    ) -> tuple[AttnContext, torch.Tensor]:
        """Training / scoring: every token attends to earlier ones (and the sinks/window rule)."""
        if mask is None:
            positions = torch.arange(T, device=device)[None]  # (1, T)
        else:
            positions = (mask.long().cumsum(1) - 1).clamp_min(0)  # left padding starts at 0
        return self._full_mask(mask, positions, T, device, local=False), positions

    def _full_mask(self, mask: torch.Tensor | None, positions: torch.Tensor, T: int, device: torch.device,
                   local: bool) -> AttnContext:
        cos, sin = self._angles(positions, local)
        window = self._window(local)
        if mask is None and window is None:
            return AttnContext(cos, sin, None, is_causal=True)
        idx = torch.arange(T, device=device)
        attn = self._allowed(idx[:, None], idx[None, :], positions[..., :, None], positions[..., None, :], window)
        if mask is not None:
            attn = attn & mask[:, None, :]
        attn = attn | torch.eye(T, dtype=torch.bool, device=device)  # padded rows: no all-False row
        return AttnContext(cos, sin, attn[:, None], is_causal=False)

    def _allowed(self, q_slot, k_slot, q_pos, k_pos, window: int | None) -> torch.Tensor:
        """Causal in slot order, plus the sliding window (by position) with sinks always visible."""
        allowed = k_slot <= q_slot
        if window is not None:
            allowed = allowed & ((q_pos - k_pos < window) | (k_pos < self.config.sink_tokens))
        return allowed

    def _cached_context(
        self, cache: KVCache, mask: torch.Tensor | None, B: int, T: int, device: torch.device
    ) -> tuple[AttnContext, torch.Tensor]:
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=device)
        start, positions = cache.begin(mask)
        return self._cached_mask(cache, start, positions, T, device, local=False), positions

    def _cached_mask(self, cache: KVCache, start: int, positions: torch.Tensor, T: int, device: torch.device,
                     local: bool) -> AttnContext:
        B, S = positions.shape[0], start + T
        if cache.streaming:  # StreamingLLM: RoPE positions are cache slots
            slots = torch.arange(S, device=device)[None]
            cos, sin = self._angles(slots[:, start:])
            key_cos, key_sin = self._angles(slots)
        else:
            cos, sin = self._angles(positions, local)
            key_cos = key_sin = None
        ctx = AttnContext(cos, sin, None, is_causal=False, cache=cache, start=start, key_cos=key_cos, key_sin=key_sin)
        window = self._window(local)
        simple = not cache.has_padding and (window is None or S <= window)
        if simple and T == 1:
            return ctx  # one new token sees every cached slot
        if simple and start == 0:
            ctx.is_causal = True
            return ctx
        q_slot = torch.arange(start, S, device=device)
        k_slot = torch.arange(S, device=device)
        if cache.streaming:  # distances are measured in slots, as RoPE sees them
            q_pos, k_pos = q_slot[None, :, None], k_slot[None, None, :]
        else:
            q_pos, k_pos = positions[:, :, None], cache.slot_pos[:B, None, :S]
        attn = self._allowed(q_slot[:, None], k_slot[None, :], q_pos, k_pos, window)
        attn = attn & cache.key_mask[:B, None, :S]  # the cache's first B rows (it may hold more)
        attn[:, torch.arange(T, device=device), q_slot] = True  # padded rows: no all-False row
        ctx.mask = attn[:, None]
        return ctx

    def _local_context(self, ctx: AttnContext, mask: torch.Tensor | None, positions: torch.Tensor, T: int,
                       device: torch.device) -> AttnContext:
        """The windowed layers' context beside the global one `ctx` (same tokens, same cache slots)."""
        if ctx.cache is None:
            return self._full_mask(mask, positions, T, device, local=True)
        return self._cached_mask(ctx.cache, ctx.start, positions, T, device, local=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The raw Transformer under torch.compile / DDP / FSDP wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            return model
        model = inner
