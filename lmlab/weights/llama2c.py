"""llama2.c checkpoints: the `.bin` files run.c / runq.c read, and the `.pt` that train.py writes.

Formats (karpathy/llama2.c export.py):
- legacy (v0): 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a
  negative vocab_size means an unshared classifier), then fp32 tensors grouped by kind across layers:
  embedding, attention norms, wq, wk, wv, wo, ffn norms, w1, w2, w3, final norm, RoPE cos and sin
  tables (skipped: lmlab computes its own), and the classifier when unshared.
- version 1: a 256-byte header (magic "ak42", version, the 7 ints, a shared-classifier byte), then
  fp32 norms first, then embedding, wq..w3 and the optional classifier.
- version 2: the same header plus the quantization group size; norms in fp32, then every matrix as
  int8 (Q8_0: symmetric, one fp32 scale per group of `group_size` values), all scales at the end.
- train.py's `.pt`: {"model": state dict (maybe `_orig_mod.`-prefixed), "model_args": {...}}; llama2.c
  already uses lmlab's parameter names. Read with torch.load(weights_only=True): nothing is executed.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import torch

from lmlab.errors import CheckpointError, ConfigError
from lmlab.model.config import ModelConfig

MAGIC = 0x616B3432  # "ak42"
HEADER_BYTES = 256
LAYER_MATRICES = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                  "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
PT_ARGS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "multiple_of",
           "norm_eps", "max_seq_len", "dropout"}


def load_llama2c_bin(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and lmlab-named fp32 state dict from a legacy, version-1 or version-2 `.bin` file."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) >= 8 and struct.unpack_from("<I", data)[0] == MAGIC:
        version = struct.unpack_from("<i", data, 4)[0]
        if version == 1:
            return _load_v1(path, data)
        if version == 2:
            return _load_v2(path, data)
        raise CheckpointError(f"{path}: llama2.c export version {version}; supported versions: 0 (legacy), 1, 2")
    return _load_legacy(path, data)


def _read_bytes(path: Path) -> bytearray:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (expected a llama2.c .bin checkpoint)")
    buf = bytearray(path.stat().st_size)  # writable, so tensors can view it without a copy
    with open(path, "rb") as f:
        f.readinto(buf)
    return buf


def _config(path: Path, header: tuple[int, ...]) -> tuple[ModelConfig, bool]:
    """ModelConfig from the 7 header ints; also whether the classifier is shared (vocab_size > 0)."""
    dim, hidden, layers, heads, kv_heads, vocab, seq = header
    if min(dim, hidden, layers, heads, kv_heads, seq) <= 0 or vocab == 0:
        raise CheckpointError(f"{path}: header {header} is not a llama2.c checkpoint header "
                              "(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len)")
    try:
        config = ModelConfig(
            name=path.stem, vocab_size=abs(vocab), dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads,
            hidden_dim=hidden, max_seq_len=seq, norm="rmsnorm", pos="rope", mlp="swiglu", norm_eps=1e-5,
            tie_embeddings=vocab > 0,
        )
    except ConfigError as err:  # a damaged or foreign file's header
        raise CheckpointError(f"{path}: header {header} is not a llama2.c model ({err})") from None
    return config, vocab > 0


def _shapes(c: ModelConfig) -> dict[str, tuple[int, int]]:
    """Per-layer matrix shapes (out, in), as nn.Linear stores them and llama2.c writes them."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    return {"attention.wq": (q, c.dim), "attention.wk": (kv, c.dim), "attention.wv": (kv, c.dim),
            "attention.wo": (c.dim, q), "feed_forward.w1": (c.hidden_dim, c.dim),
            "feed_forward.w2": (c.dim, c.hidden_dim), "feed_forward.w3": (c.hidden_dim, c.dim)}


class _Floats:
    """Reads consecutive fp32 tensors from a buffer, with a clear error when the file is too short."""

    def __init__(self, path: Path, data: bytearray, offset: int, expected_bytes: int) -> None:
        if len(data) < expected_bytes:
            raise CheckpointError(
                f"{path}: truncated llama2.c checkpoint: {len(data)} bytes, the header implies {expected_bytes}"
            )
        self.data, self.offset = data, offset

    def take(self, *shape: int, dtype: type = np.float32) -> torch.Tensor:
        n = int(np.prod(shape))
        arr = np.frombuffer(self.data, dtype=dtype, count=n, offset=self.offset)
        self.offset += arr.nbytes
        return torch.from_numpy(arr).reshape(shape)

    def layers(self, state: dict[str, torch.Tensor], name: str, n_layers: int, *shape: int) -> None:
        for i in range(n_layers):
            state[f"layers.{i}.{name}.weight"] = self.take(*shape)


def _n_floats(c: ModelConfig, shared: bool) -> int:
    """fp32 values of a version-1 file, without the header (legacy adds the RoPE tables)."""
    per_layer = 2 * c.dim + sum(a * b for a, b in _shapes(c).values())
    return c.vocab_size * c.dim * (1 if shared else 2) + c.n_layers * per_layer + c.dim


def _load_legacy(path: Path, data: bytearray) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    if len(data) < 28:
        raise CheckpointError(f"{path}: truncated llama2.c checkpoint: {len(data)} bytes, expected a 28-byte header")
    c, shared = _config(path, struct.unpack_from("<7i", data))
    rope_table = c.max_seq_len * c.head_dim // 2
    r = _Floats(path, data, 28, 28 + 4 * (_n_floats(c, shared) + 2 * rope_table))
    state = {"tok_embeddings.weight": r.take(c.vocab_size, c.dim)}
    shapes = _shapes(c)
    r.layers(state, "attention_norm", c.n_layers, c.dim)
    for name in LAYER_MATRICES[:4]:
        r.layers(state, name, c.n_layers, *shapes[name])
    r.layers(state, "ffn_norm", c.n_layers, c.dim)
    for name in LAYER_MATRICES[4:]:
        r.layers(state, name, c.n_layers, *shapes[name])
    state["norm.weight"] = r.take(c.dim)
    r.offset += 2 * 4 * rope_table  # freq_cis_real, freq_cis_imag
    if not shared:
        state["output.weight"] = r.take(c.vocab_size, c.dim)
    return c, state


def _load_v1(path: Path, data: bytearray) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    c, shared = _versioned_config(path, data)
    r = _Floats(path, data, HEADER_BYTES, HEADER_BYTES + 4 * _n_floats(c, shared))
    state: dict[str, torch.Tensor] = {}
    r.layers(state, "attention_norm", c.n_layers, c.dim)
    r.layers(state, "ffn_norm", c.n_layers, c.dim)
    state["norm.weight"] = r.take(c.dim)
    state["tok_embeddings.weight"] = r.take(c.vocab_size, c.dim)
    shapes = _shapes(c)
    for name in LAYER_MATRICES:
        r.layers(state, name, c.n_layers, *shapes[name])
    if not shared:
        state["output.weight"] = r.take(c.vocab_size, c.dim)
    return c, state


def _versioned_config(path: Path, data: bytearray) -> tuple[ModelConfig, bool]:
    if len(data) < HEADER_BYTES:
        raise CheckpointError(f"{path}: truncated llama2.c checkpoint: {len(data)} bytes, expected a 256-byte header")
    config, _ = _config(path, struct.unpack_from("<7i", data, 8))
    shared = bool(data[36])
    config.tie_embeddings = shared
    return config, shared


def _load_v2(path: Path, data: bytearray) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Q8_0: int8 values, then one fp32 scale per group; dequantized to fp32 (w = q * scale)."""
    c, shared = _versioned_config(path, data)
    group = struct.unpack_from("<i", data, 37)[0]
    shapes = _shapes(c)
    matrices = [("tok_embeddings.weight", (c.vocab_size, c.dim))]
    for name in LAYER_MATRICES:
        matrices += [(f"layers.{i}.{name}.weight", shapes[name]) for i in range(c.n_layers)]
    if not shared:
        matrices.append(("output.weight", (c.vocab_size, c.dim)))
    n_quant = sum(a * b for _, (a, b) in matrices)
    if group <= 0 or any(a * b % group for _, (a, b) in matrices):
        raise CheckpointError(f"{path}: group size {group} does not divide every weight matrix")
    n_norm = (2 * c.n_layers + 1) * c.dim
    expected = HEADER_BYTES + 4 * n_norm + n_quant + 4 * (n_quant // group)
    r = _Floats(path, data, HEADER_BYTES, expected)
    state: dict[str, torch.Tensor] = {}
    r.layers(state, "attention_norm", c.n_layers, c.dim)
    r.layers(state, "ffn_norm", c.n_layers, c.dim)
    state["norm.weight"] = r.take(c.dim)
    quants = [r.take(a * b // group, group, dtype=np.int8) for _, (a, b) in matrices]
    for (name, shape), q in zip(matrices, quants):
        scale = r.take(q.shape[0], 1)
        state[name] = (q.float() * scale).reshape(shape)
    return c, state


def load_llama2c_pt(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and state dict from train.py's `ckpt.pt` (weights_only: no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (expected a llama2.c train.py .pt checkpoint)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path}: not a readable weights-only PyTorch checkpoint ({msg})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise CheckpointError(f"{path}: expected a llama2.c train.py checkpoint (a dict with 'model' and 'model_args')")
    args = dict(ckpt["model_args"])
    unknown = sorted(set(args) - PT_ARGS)
    if unknown:
        raise CheckpointError(f"{path}: unknown model_args key(s) {unknown}; expected keys from {sorted(PT_ARGS)}")
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    state = {k: v for k, v in state.items() if not k.startswith("freqs_")}  # RoPE tables of old versions
    out, emb = state.get("output.weight"), state.get("tok_embeddings.weight")
    tied = out is None or (emb is not None and (out is emb or torch.equal(out, emb)))
    try:
        config = ModelConfig(
            name=path.stem, vocab_size=args["vocab_size"], dim=args["dim"], n_layers=args["n_layers"],
            n_heads=args["n_heads"], n_kv_heads=args.get("n_kv_heads"), hidden_dim=args.get("hidden_dim"),
            # missing optional args take llama2.c ModelArgs' defaults, not lmlab's
            multiple_of=args.get("multiple_of", 256), norm_eps=args.get("norm_eps", 1e-5),
            max_seq_len=args["max_seq_len"], norm="rmsnorm", pos="rope", mlp="swiglu", tie_embeddings=tied,
        )
    except (ConfigError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: model_args {args} do not describe a model ({err})") from None
    return config, state
