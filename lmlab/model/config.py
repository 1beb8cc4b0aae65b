"""ModelConfig: the one place that owns a model's shapes, plus named presets.

Derived sizes (head_dim, n_kv_heads, FFN hidden size, attention window) are computed once in
`__post_init__` and never again in the modules. The config is saved beside every checkpoint as
`config.json`, and loading rebuilds the model from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.errors import ConfigError
from lmlab.fileio import atomic_write_text

_CHOICES = {
    "norm": ("rmsnorm", "layernorm"),
    "pos": ("rope", "learned", "none"),
    "mlp": ("swiglu", "geglu", "gelu"),
    "gelu_approximate": ("none", "tanh"),
    "rope_scaling": (None, "linear", "ntk"),
}


# numeric fields: (lowest allowed, highest allowed, whether the bounds are included, as written in errors)
RANGES: dict[str, tuple[float, float, bool, bool, str]] = {
    "vocab_size": (1, math.inf, True, False, ">= 1"), "dim": (1, math.inf, True, False, ">= 1"),
    "n_layers": (1, math.inf, True, False, ">= 1"), "n_heads": (1, math.inf, True, False, ">= 1"),
    "n_kv_heads": (1, math.inf, True, False, ">= 1"), "head_dim": (1, math.inf, True, False, ">= 1"),
    "hidden_dim": (1, math.inf, True, False, ">= 1"), "multiple_of": (1, math.inf, True, False, ">= 1"),
    "ffn_mult": (0, math.inf, False, False, "> 0"), "max_seq_len": (1, math.inf, True, False, ">= 1"),
    "norm_eps": (0, 1, False, False, "in (0, 1)"), "rope_theta": (0, math.inf, False, False, "> 0"),
    "rope_scaling_factor": (1, math.inf, True, False, ">= 1"), "dropout": (0, 1, True, False, "in [0, 1)"),
    "n_experts": (0, math.inf, True, False, ">= 0"), "n_experts_per_tok": (1, math.inf, True, False, ">= 1"),
    "moe_aux_loss_coef": (0, math.inf, True, False, ">= 0"), "sink_tokens": (0, math.inf, True, False, ">= 0"),
    "window": (1, math.inf, True, False, ">= 1"),
}


def check_range(key: str, value: object) -> None:
    """A ConfigError naming `model.key` when a numeric field is outside its range (None = derived)."""
    if key not in RANGES or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    lo, hi, lo_in, hi_in, text = RANGES[key]
    ok = math.isfinite(value) and (value >= lo if lo_in else value > lo) and (value <= hi if hi_in else value < hi)
    if not ok:
        raise ConfigError(f"model.{key}={value!r}: expected {text}")


@dataclass
class ModelConfig:
    """Every shape and switch of the native decoder (see lmlab/model/transformer.py)."""

    name: str = "custom"
    """Preset or model name, for display only."""
    vocab_size: int = 32000
    """Number of token ids (rows of the embedding and columns of the output head)."""
    dim: int = 288
    """Width of the residual stream."""
    n_layers: int = 6
    """Number of transformer blocks."""
    n_heads: int = 6
    """Query heads."""
    n_kv_heads: int | None = None
    """Key/value heads: n_heads = multi-head, fewer = grouped-query, 1 = multi-query. Default n_heads."""
    head_dim: int | None = None
    """Per-head width. Default dim // n_heads."""
    hidden_dim: int | None = None
    """FFN inner width. Default: llama2.c's rule for SwiGLU (2/3 of 4*dim, rounded up to multiple_of),
    ffn_mult*dim for GELU."""
    multiple_of: int = 32
    """Rounding of the derived SwiGLU hidden size (llama2.c / Meta rule)."""
    ffn_mult: float = 4.0
    """FFN expansion used to derive hidden_dim when it is not given."""
    max_seq_len: int = 256
    """Trained context length (rows of the learned position table)."""
    norm: str = "rmsnorm"
    """rmsnorm | layernorm (both lmlab's own code)."""
    norm_eps: float = 1e-5
    """Epsilon inside the norm."""
    norm_bias: bool = True
    """LayerNorm has a learned bias (ignored by RMSNorm)."""
    pos: str = "rope"
    """rope | learned | none: rotary or learned absolute positions."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: str | None = None
    """None | linear (position interpolation) | ntk (base stretched): context extension."""
    rope_scaling_factor: float = 1.0
    """How many times the trained context the scaling targets."""
    mlp: str = "swiglu"
    """swiglu (w2(silu(w1 x) * w3 x)) | geglu (w2(gelu(w1 x) * w3 x), Gemma) | gelu (w2(gelu(w1 x)))."""
    gelu_approximate: str = "none"
    """none (exact erf GELU) | tanh (GPT-2's gelu_new, Gemma's gelu_pytorch_tanh)."""
    qkv_bias: bool = False
    """Biases on wq/wk/wv (GPT-2, Qwen2)."""
    out_bias: bool = False
    """Bias on the attention output projection wo (GPT-2)."""
    mlp_bias: bool = False
    """Biases on the FFN linears (GPT-2)."""
    tie_embeddings: bool = True
    """The output head shares the token-embedding matrix."""
    dropout: float = 0.0
    """Dropout on attention probabilities and on each residual branch (training only)."""
    n_experts: int = 0
    """Mixture-of-experts FFN with this many experts; 0 = dense FFN."""
    n_experts_per_tok: int = 2
    """Experts each token is routed to (top-k)."""
    moe_aux_loss_coef: float = 0.01
    """Weight of the load-balancing loss the model exposes as `model.aux_loss`."""
    sink_tokens: int = 0
    """Attention sinks (StreamingLLM): the first k positions stay visible to every query and in the
    KV cache, while older middle positions slide out, so generation runs past the trained context."""
    window: int | None = None
    """Sliding attention window (recent positions each query sees, itself included). Default with
    sinks: max_seq_len - sink_tokens; without sinks: unlimited."""
    global_every: int = 0
    """With a window: every k-th layer (layers k-1, 2k-1, ...) attends to all positions and the others
    through the window (Gemma 3: 6, five local layers per global one). 0 = every layer uses the window."""
    rope_local_theta: float | None = None
    """RoPE base of the windowed layers when global_every is set (Gemma 3: 10000; rope_theta and
    rope_scaling are then the global layers'). Default rope_theta."""
    qk_norm: bool = False
    """RMSNorm over each query and key head (learned per channel) before RoPE (Gemma 3, Qwen3)."""
    post_norms: bool = False
    """Also normalise the outputs of attention and of the FFN before each residual add (Gemma 2/3's
    "sandwich": x + norm(attn(norm(x))))."""
    scale_embeddings: bool = False
    """Multiply the token embeddings by sqrt(dim) (Gemma; in the embedding's dtype, as the reference)."""

    def __post_init__(self) -> None:
        for key in RANGES:
            check_range(key, getattr(self, key))
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"model.{key}={getattr(self, key)!r}: expected one of {allowed}")
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                raise ConfigError(f"model.{key}={getattr(self, key)!r}: expected a positive integer")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_kv_heads={self.n_kv_heads}: must divide n_heads={self.n_heads}"
            )
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(f"model.dim={self.dim}: must be divisible by n_heads={self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.pos == "rope" and self.head_dim % 2:
            raise ConfigError(f"model.head_dim={self.head_dim}: RoPE needs an even head size")
        if self.hidden_dim is None:
            self.hidden_dim = self._derived_hidden_dim()
        if self.n_experts and not 0 < self.n_experts_per_tok <= self.n_experts:
            raise ConfigError(
                f"model.n_experts_per_tok={self.n_experts_per_tok}: expected 1..n_experts={self.n_experts}"
            )
        if self.sink_tokens < 0:
            raise ConfigError(f"model.sink_tokens={self.sink_tokens}: expected >= 0")
        if self.window is None and self.sink_tokens:
            self.window = self.max_seq_len - self.sink_tokens
        if self.window is not None and self.window <= 0:
            raise ConfigError(f"model.window={self.window}: expected a positive integer")
        if self.global_every < 0 or (self.global_every and (self.window is None or self.sink_tokens)):
            raise ConfigError(f"model.global_every={self.global_every}: expected 0, or k > 0 with a window "
                              "and no sink_tokens")
        if self.rope_local_theta is None:
            self.rope_local_theta = self.rope_theta

    def _derived_hidden_dim(self) -> int:
        hidden = int(self.ffn_mult * self.dim)
        if self.mlp in ("swiglu", "geglu"):  # 2/3 keeps the parameter count of a 4x GELU MLP (llama2.c model.py)
            hidden = int(2 * hidden / 3)
            hidden = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        return hidden

    def is_local(self, layer: int) -> bool:
        """Whether `layer` attends through the window with the local RoPE base (see global_every)."""
        return bool(self.global_every) and (layer + 1) % self.global_every != 0

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "ModelConfig":
        """Build from a dict, rejecting unknown keys by name (a typo must not silently change a model)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown model config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: model config not found") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(data, source=str(path))


_LLAMA2C = dict(norm="rmsnorm", pos="rope", mlp="swiglu", tie_embeddings=True, norm_eps=1e-5)
_GPT2 = dict(
    norm="layernorm", pos="learned", mlp="gelu", gelu_approximate="tanh", qkv_bias=True,
    out_bias=True, mlp_bias=True, tie_embeddings=True, norm_eps=1e-5,
)

PRESETS: dict[str, dict[str, Any]] = {
    # llama2.c model table (https://github.com/karpathy/llama2.c#models)
    "llama2c-stories260k": dict(
        _LLAMA2C, vocab_size=512, dim=64, n_layers=5, n_heads=8, n_kv_heads=4, hidden_dim=172,
        max_seq_len=512,
    ),
    "llama2c-stories15m": dict(_LLAMA2C, vocab_size=32000, dim=288, n_layers=6, n_heads=6, max_seq_len=256),
    "llama2c-stories42m": dict(_LLAMA2C, vocab_size=32000, dim=512, n_layers=8, n_heads=8, max_seq_len=1024),
    # seed 002 (the minllama assignment): stories42M's shape with LayerNorm (gain only, no bias) in place of RMSNorm
    "minillama-stories42m": dict(_LLAMA2C, norm="layernorm", norm_bias=False, vocab_size=32000, dim=512, n_layers=8,
                                 n_heads=8, max_seq_len=1024),
    "llama2c-stories110m": dict(_LLAMA2C, vocab_size=32000, dim=768, n_layers=12, n_heads=12, max_seq_len=1024),
    "smollm2-135m": dict(
        _LLAMA2C, vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
        max_seq_len=8192, rope_theta=100000.0,
    ),
    "gpt2-124m": dict(_GPT2, vocab_size=50257, dim=768, n_layers=12, n_heads=12, max_seq_len=1024),
    # seed 003 (MiniGPT baseline): learned positions, LayerNorm, GELU FFN x4, untied LM head
    "minigpt-baseline": dict(
        norm="layernorm", pos="learned", mlp="gelu", qkv_bias=True, out_bias=True, mlp_bias=True,
        tie_embeddings=False, vocab_size=50257, dim=128, n_layers=2, n_heads=4, max_seq_len=64,
        dropout=0.1,
    ),
    # seed 001 (modern decoder): RMSNorm, SwiGLU, RoPE, GQA, attention sinks
    "modern-decoder": dict(
        _LLAMA2C, vocab_size=50257, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256,
        sink_tokens=4,
    ),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset config by name, with optional field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; presets: {sorted(PRESETS)}")
    return ModelConfig.from_dict({"name": name, **PRESETS[name], **overrides}, source=f"preset {name}")


def field_docs() -> dict[str, str]:
    """Field name -> its docstring, for `lmlab info` and config guides (parsed from this file)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(ModelConfig))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[union-attr]
    return docs


__all__ = ["ModelConfig", "PRESETS", "get_preset", "field_docs"]
