"""How much device memory a training run needs, from its model config and batch geometry, before it runs
(`lmlab run RECIPE --dry-run`): weights, gradients, AdamW state, autocast weight copies, the activations
autograd saves for the backward pass, and the fused loss's buffers.

The activation count follows what lmlab's own modules save (the per-layer bookkeeping of Korthikanti et
al. 2022, "Reducing Activation Recomputation in Large Transformer Models", redone for this decoder):
per layer and token, each norm keeps its fp32 input, its normalized fp32 product and one rsqrt; each
linear keeps its input in the compute dtype; RoPE keeps fp32 copies of q and k; fused attention (SDPA:
flash / memory-efficient kernels, the CUDA path) keeps q, k, v, its output and one fp32 log-sum-exp per
head, while CPU's math path for small shapes also keeps the fp32 probabilities and their cast (the T^2
term); SwiGLU keeps w1 x, w3 x, silu(w1 x) and their product. tests/test_memory.py checks the count
against the bytes autograd really saves (saved-tensor hooks) for several shapes, both dtypes and both
attention paths. Not counted: the CUDA context (~0.3-0.5 GB), allocator fragmentation and the backward
pass's transient gradients, hence the headroom `fits` leaves.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmlab.model.config import ModelConfig

GIB = 1024**3
HEADROOM = 0.10
"""Share of device memory left for the CUDA context, fragmentation and backward temporaries."""
LOSS_CHUNK_ELEMS = 1 << 27
"""lmlab.train.losses.linear_cross_entropy's default chunk (logits per matmul)."""


@dataclass
class MemoryEstimate:
    """Bytes of each part of a training step's peak, and the total."""

    weights: int
    gradients: int
    optimizer: int
    weight_copies: int
    activations: int
    loss_buffers: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.weight_copies + self.activations + \
            self.loss_buffers

    def fits(self, device_bytes: float) -> bool:
        """True when the total leaves HEADROOM of `device_bytes` free."""
        return self.total <= (1 - HEADROOM) * device_bytes

    def rows(self) -> list[tuple[str, int]]:
        return [("weights (fp32)", self.weights), ("gradients (fp32)", self.gradients),
                ("AdamW state (2 x fp32)", self.optimizer), ("autocast weight copies", self.weight_copies),
                ("activations saved for backward", self.activations), ("loss buffers", self.loss_buffers),
                ("total", self.total)]


def matrix_params(c: ModelConfig) -> int:
    """Parameters of the blocks' linear layers: what autocast casts and keeps for backward (embeddings
    and norms stay fp32; the output head is cast inside the fused loss, see loss buffers)."""
    attn = c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
    ffn = (3 if c.mlp == "swiglu" else 2) * c.dim * c.hidden_dim * max(c.n_experts, 1) + c.dim * c.n_experts
    return c.n_layers * (attn + ffn)


def total_params(c: ModelConfig) -> int:
    """Every parameter of a Transformer built from `c` (lmlab.model.transformer), counted from the config."""
    biases = c.n_layers * ((c.n_heads + 2 * c.n_kv_heads) * c.head_dim * c.qkv_bias + c.dim * c.out_bias
                           + (c.hidden_dim + c.dim) * c.mlp_bias * max(c.n_experts, 1))
    norms = (2 * c.n_layers + 1) * c.dim * (2 if c.norm == "layernorm" and c.norm_bias else 1)
    embeddings = c.vocab_size * c.dim * (1 if c.tie_embeddings else 2)
    embeddings += c.max_seq_len * c.dim if c.pos == "learned" else 0
    return int(matrix_params(c) + biases + norms + embeddings)


def norm_bytes(c: ModelConfig) -> int:
    """Per token: RMSNorm keeps its fp32 input and normalized product and one rsqrt; LayerNorm the centred
    input twice (for the variance and for the output) instead of the input."""
    return (12 if c.norm == "layernorm" else 8) * c.dim + 4


def layer_activation_bytes(c: ModelConfig, tokens: int, seq_len: int, dtype: str, math_attention: bool) -> int:
    """Bytes one block saves for backward over `tokens` tokens (batch x seq_len)."""
    a = 4 if dtype == "fp32" else 2
    q, kv, hidden = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.hidden_dim
    norms = 2 * norm_bytes(c)
    linear_inputs = 2 * a * c.dim  # the norms' outputs, read by wq/wk/wv and by w1/w3
    if math_attention:  # scaled q, k and v (GQA-expanded), wo's input; fp32 probabilities and their cast
        attention = 4 * a * q + c.n_heads * seq_len * (4 + (a if a != 4 else 0))
    else:  # q, k, v, the output (which wo reads in place), fp32 log-sum-exp per head
        attention = a * (2 * q + 2 * kv) + 4 * c.n_heads
    ffn = (4 if c.mlp == "swiglu" else 2) * a * hidden  # SwiGLU: w1 x, w3 x, silu(w1 x), product
    if c.n_experts:  # each token runs through top-k experts, plus the router's fp32 logits
        ffn = ffn * c.n_experts_per_tok + 4 * c.n_experts
    return tokens * (norms + linear_inputs + attention + ffn)


def estimate_training_memory(c: ModelConfig, batch_size: int, seq_len: int, dtype: str = "fp32", *,
                             trainable: int | None = None, math_attention: bool = False) -> MemoryEstimate:
    """The peak of a training step with micro-batches of `batch_size` x `seq_len` tokens (gradient
    accumulation adds nothing: gradients accumulate in place). trainable: parameters that train (default
    all); math_attention: CPU's math attention path (lmlab.model.attention.use_math_attention)."""
    n_params = total_params(c)
    trainable = n_params if trainable is None else trainable
    a = 4 if dtype == "fp32" else 2
    tokens = batch_size * seq_len
    activations = c.n_layers * layer_activation_bytes(c, tokens, seq_len, dtype, math_attention)
    activations += tokens * (8 + norm_bytes(c))  # token ids, the final norm
    V, D = c.vocab_size, c.dim
    # the fused loss: d loss / d hidden and d loss / d head (compute dtype), its logits workspace, the head's cast
    loss = a * D * tokens + a * V * D + a * V * min(tokens, max(16, LOSS_CHUNK_ELEMS // V))
    loss += a * V * D if a != 4 else 0
    return MemoryEstimate(weights=4 * n_params, gradients=4 * trainable, optimizer=8 * trainable,
                          weight_copies=0 if a == 4 else a * matrix_params(c), activations=activations,
                          loss_buffers=loss)


def report(est: MemoryEstimate, device_bytes: float, device: str) -> str:
    """The estimate as a table, with the verdict for `device_bytes`."""
    lines = [f"  {name:34s} {n / GIB:8.2f} GiB" for name, n in est.rows()]
    verdict = "yes" if est.fits(device_bytes) else "NO"
    lines.append(f"fits in {device_bytes / GIB:.1f} GiB ({device}) with {HEADROOM:.0%} headroom: {verdict}")
    return "\n".join(lines)
