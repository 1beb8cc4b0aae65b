"""One decoding step of a Llama-family model in few PyTorch calls: generation's hot loop.

Each generated token runs the whole model for one position. For SmolLM2-135M with 4-bit weights the
weights take ~7 ms to read per token, while Transformer.forward issued ~200 small PyTorch calls per
layer (module calls, dtype casts, mask and position bookkeeping, views), which cost more than that.
`FastDecoder.step` computes the same thing with ~40 calls per layer and no module calls: the (fused)
projections' kernels called directly, RoPE on queries and keys in one complex multiply, keys and values
written into the cache and read back as views, the attention scale folded into one batched matmul.

It covers the plain Llama layout (RMSNorm, RoPE, SwiGLU; grouped-query attention; biases; left-padded
batches) with a plain KV cache; `fast_decode_supported` says when, and generation falls back to the
model's forward otherwise (sliding windows, sinks, MoE, LayerNorm / GELU models, training mode, and any
ModelConfig switch this file does not know).
Tested against Transformer.forward step by step (tests/test_decode.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from lmlab.model.config import ModelConfig
from lmlab.model.kv_cache import KVCache
from lmlab.model.quantize import GROUP, Int4Linear, Int8Linear, linear_dtype
from lmlab.model.rope import rope_angles
from lmlab.model.transformer import Transformer

# ModelConfig fields the fast step handles at any value; every other field must keep its default
# (a new architectural switch is then off the fast path until this file learns it).
FREE_FIELDS = {
    "name", "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "multiple_of",
    "ffn_mult", "max_seq_len", "norm_eps", "norm_bias", "rope_theta", "rope_scaling", "rope_scaling_factor",
    "gelu_approximate", "qkv_bias", "out_bias", "mlp_bias", "tie_embeddings", "dropout", "n_experts_per_tok",
    "moe_aux_loss_coef", "rope_local_theta",
}


def _plain_llama(config: ModelConfig) -> bool:
    default = ModelConfig()
    return all(getattr(config, f.name) == getattr(default, f.name)
               for f in dataclasses.fields(config) if f.name not in FREE_FIELDS) \
        and config.rope_local_theta == config.rope_theta  # (a free field only where no layer is local)


def fast_decode_supported(model: nn.Module, cache: KVCache) -> bool:
    """Whether FastDecoder.step computes what model(ids, cache=cache) would."""
    return (isinstance(model, Transformer) and not model.training and not cache.streaming
            and _plain_llama(model.config))


def _kernel(module: nn.Module, rows: int) -> bool:
    """Whether x (rows, in) -> module(x) runs a CPU quantized kernel (which takes `module.kernel_dtype`)."""
    return isinstance(module, (Int4Linear, Int8Linear)) and module.uses_kernel(rows) and module.bias is None


def _matmul(module: nn.Module, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """x (rows, in) -> module(x): the bare kernel for quantized / plain linears on CPU, else the module.
    Inputs are cast to what the kernel or weight takes (a no-op when they already are)."""
    if _kernel(module, rows):
        qweight, dtype = module.qweight, module.kernel_dtype
        if isinstance(module, Int4Linear):
            sz = module.scales_and_zeros
            return lambda x: torch._weight_int4pack_mm_for_cpu(x.to(dtype), qweight, GROUP, sz)
        scale = module.kernel_scale
        return lambda x: torch._weight_int8pack_mm(x.to(dtype), qweight, scale)
    if type(module) is nn.Linear:
        weight, bias = module.weight, module.bias
        return lambda x: torch.nn.functional.linear(x.to(weight.dtype), weight, bias)
    return module


def _concat(module: nn.Module, parts: tuple[str, ...], fused: str, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The fused projection's kernel, or the parts' outputs concatenated (parts of different kinds, e.g. a
    Q4_K_M file's Q4_K queries and Q6_K values, are not fused)."""
    if getattr(module, fused) is not None:
        return _matmul(getattr(module, fused), rows)
    fns = [_matmul(getattr(module, p), rows) for p in parts]
    return lambda x: torch.cat([f(x) for f in fns], -1)


@dataclass
class _Layer:
    attention_norm: torch.Tensor  # fp32 norm weights
    ffn_norm: torch.Tensor
    wqkv: Callable
    wo: Callable
    w13: Callable
    w2: Callable


class FastDecoder:
    """The decode step's per-model preparation (the kernels and fp32 norm weights of every layer), made once per
    generation call for a batch size. The residual stream stays in fp32 between layers (the model's forward
    rounds it to the weights' dtype after every block), so bf16 models come out slightly more accurate."""

    def __init__(self, model: Transformer, rows: int) -> None:
        c = model.config
        self.model, self.config = model, c
        self.layers = [
            _Layer(b.attention_norm.weight.float(), b.ffn_norm.weight.float(),
                   _concat(b.attention, ("wq", "wk", "wv"), "wqkv", rows), _matmul(b.attention.wo, rows),
                   _concat(b.feed_forward, ("w1", "w3"), "w13", rows), _matmul(b.feed_forward.w2, rows))
            for b in model.layers
        ]
        self.norm = model.norm.weight.float()
        self.output = _matmul(model.output, rows)
        # the linears' input dtype (norm weights may stay fp32): the kernel's where the head is one
        out = model.output
        self.dtype = out.kernel_dtype if _kernel(out, rows) else linear_dtype(out)
        self.eps = torch.full((1,), c.norm_eps, device=self.norm.device)
        # RoPE for queries and keys in one complex multiply; the queries' rotation carries 1/sqrt(head_dim)
        self.head_scale = torch.ones(c.n_heads + c.n_kv_heads, 1, device=self.norm.device)
        self.head_scale[: c.n_heads] = c.head_dim**-0.5

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm of the fp32 stream (x / sqrt(mean(x^2) + eps) * g), written in the weights' dtype."""
        n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        r = torch.rsqrt(torch.addcmul(self.eps, n, n, value=1 / x.shape[-1]))
        return torch.mul(x * r, weight, out=torch.empty(x.shape, dtype=self.dtype, device=x.device))

    def _out_and_mlp(self, x: torch.Tensor, layer: _Layer, y: torch.Tensor) -> None:
        """The rest of a block on the fp32 stream x (rows, dim), in place: attention output y (rows, H D)
        through wo, then the SwiGLU MLP, each added to x."""
        x += layer.wo(y.to(self.dtype))
        gate, up = layer.w13(self._rms_norm(x, layer.ffn_norm)).chunk(2, -1)
        x += layer.w2(torch.nn.functional.silu(gate).mul_(up))

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, vocab) for one new token per row (ids (B,)), appended to the cache's first B rows (a
        server's cache has free rows after its live ones)."""
        c, model = self.config, self.model
        B, H, Hkv, D = ids.shape[0], c.n_heads, c.n_kv_heads, c.head_dim
        G, nq, nkv, L = H // Hkv, H * D, Hkv * D, c.n_layers
        start, positions = cache.advance(B)
        S = start + 1
        cos, sin = rope_angles(positions, model.rope_inv_freq, c.rope_scaling, c.rope_scaling_factor)
        rot = torch.complex(cos, sin)[:, None] * self.head_scale  # (B, H + Hkv, D/2)
        # this step's cache slots and filled prefix, as views per layer: (B, Hkv, D) and (B Hkv, S|D, D|S)
        k_new, v_new = cache.k[:, :B, :, start].unbind(0), cache.v[:, :B, :, start].unbind(0)
        keys = cache.k[:, :B, :, :S].reshape(L, B * Hkv, S, D).transpose(-1, -2).unbind(0)
        values = cache.v[:, :B, :, :S].reshape(L, B * Hkv, S, D).unbind(0)
        bias = None
        if cache.has_padding:  # left padding (and a server's holes): those slots are never attended to
            bias = torch.zeros(B, Hkv, 1, S, device=ids.device)
            bias.masked_fill_(~cache.key_mask[:B, None, None, :S], float("-inf"))
            bias = bias.view(B * Hkv, 1, S)
        x = model.tok_embeddings(ids).float()  # (B, dim), the fp32 residual stream
        for i, layer in enumerate(self.layers):
            qkv = layer.wqkv(self._rms_norm(x, layer.attention_norm))  # (B, (H + 2 Hkv) D)
            qk = torch.view_as_complex(qkv[:, : nq + nkv].view(B, H + Hkv, D // 2, 2).float()) * rot
            qk = torch.view_as_real(qk).view(B, H + Hkv, D)  # rotated; queries scaled by 1/sqrt(D)
            k_new[i].copy_(qk[:, H:])
            v_new[i].copy_(qkv[:, nq + nkv :].view(B, Hkv, D))
            q = qk[:, :H].reshape(B * Hkv, G, D)
            scores = torch.bmm(q, keys[i]) if bias is None else torch.baddbmm(bias, q, keys[i])  # (B Hkv, G, S)
            y = torch.bmm(scores.softmax(-1), values[i])  # (B Hkv, G, D)
            self._out_and_mlp(x, layer, y.view(B, nq))
        return self.output(self._rms_norm(x, self.norm))

    @torch.inference_mode()
    def forward_tokens(self, ids: torch.Tensor, mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, T, vocab) for T new tokens per row (ids, mask (B, T); False = right padding, e.g. a row
        with fewer drafts), appended to the cache's first B rows: speculative decoding's verify forward,
        with `step`'s few calls (one matmul per projection for all B*T tokens, causal within the T)."""
        c, model = self.config, self.model
        (B, T), H, Hkv, D = ids.shape, c.n_heads, c.n_kv_heads, c.head_dim
        G, nq, nkv, L = H // Hkv, H * D, Hkv * D, c.n_layers
        start, positions = cache.begin(mask)  # (B, T) positions; the padded slots' key_mask False
        S = start + T
        cos, sin = rope_angles(positions, model.rope_inv_freq, c.rope_scaling, c.rope_scaling_factor)
        rot = torch.complex(cos, sin)[:, :, None] * self.head_scale  # (B, T, H + Hkv, D/2)
        keys = cache.k[:, :B, :, :S].reshape(L, B * Hkv, S, D).transpose(-1, -2).unbind(0)
        values = cache.v[:, :B, :, :S].reshape(L, B * Hkv, S, D).unbind(0)
        # a query sees the real slots up to its own: (B Hkv, 1, T, S), broadcast over the G heads of a group
        seen = cache.key_mask[:B, None, :S] & (torch.arange(S, device=ids.device) <= start +
                                               torch.arange(T, device=ids.device)[:, None])  # (B, T, S)
        bias = torch.zeros(B, T, S, device=ids.device).masked_fill_(~seen, float("-inf"))
        bias = bias[:, None].expand(B, Hkv, T, S).reshape(B * Hkv, 1, T, S)
        x = model.tok_embeddings(ids.reshape(-1)).float()  # (B T, dim)
        for i, layer in enumerate(self.layers):
            qkv = layer.wqkv(self._rms_norm(x, layer.attention_norm)).view(B, T, -1)
            qk = torch.view_as_complex(qkv[..., : nq + nkv].view(B, T, H + Hkv, D // 2, 2).float()) * rot
            qk = torch.view_as_real(qk).view(B, T, H + Hkv, D)
            cache.k[i, :B, :, start:S] = qk[:, :, H:].transpose(1, 2)
            cache.v[i, :B, :, start:S] = qkv[..., nq + nkv :].view(B, T, Hkv, D).transpose(1, 2)
            # the G heads' T queries of a group as one (G T)-row matrix: bmm reads the cache views in place
            # (a 4-D matmul broadcasting them over G copies every layer's cache each forward)
            q = qk[:, :, :H].reshape(B, T, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B * Hkv, G * T, D)
            scores = torch.bmm(q, keys[i]).view(B * Hkv, G, T, S).add_(bias)  # (B Hkv, G, T, S)
            y = torch.bmm(scores.softmax(-1).view(B * Hkv, G * T, S), values[i])  # (B Hkv, G T, D)
            y = y.view(B, Hkv, G, T, D).permute(0, 3, 1, 2, 4).reshape(B * T, nq)
            self._out_and_mlp(x, layer, y)
        return self.output(self._rms_norm(x, self.norm)).view(B, T, -1)
