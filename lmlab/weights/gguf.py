"""GGUF files (llama.cpp's format) with Llama-family architectures: config, weights and tokenizer.

Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q2_K..Q6_K (what Q4_K_M
and friends mix) are decoded by lmlab.weights.gguf_quants, in torch, bit for bit equal to the package's
`gguf.quants.dequantize`, which decodes the rarer types (IQ*, TQ*, MXFP4). Supported architectures:
- `llama` (Llama, Mistral, SmolLM, TinyLlama...): llama.cpp's convert_hf_to_gguf.py already permutes
  q/k rows into the interleaved RoPE layout lmlab uses, so tensors map one to one.
- `qwen2`: stored in Hugging Face's rotate-half layout (llama.cpp runs it with NEOX RoPE), so wq/wk and
  their biases are permuted on load, as for a Hugging Face directory.
- `gemma3` (text): rotate-half like qwen2 (the per-head q/k norm weights are permuted the same way);
  the norm weights already hold Gemma's 1 + w (convert_hf_to_gguf.py adds the 1), which is lmlab's
  convention too. Local/global layers, their RoPE bases and the window come from the metadata, with
  llama.cpp's defaults (every 6th layer global, local base 10000) where the file leaves them out.
The header is walked by lmlab.gguf_file (gguf.GGUFReader spends 17 s on Gemma 3's 262k-token
vocabulary). This module dequantizes every tensor (`load_gguf`, the exact path); lmlab.weights.gguf_packed
keeps Q4_0/Q4_1/Q4_K/Q8_0 packed for the matmul from the same reader and metadata (`quantize="auto"`).
The tokenizer lives in the file's metadata (`tokenizer.ggml.*`) and is built by lmlab.tokenization.
"""

from __future__ import annotations

import contextlib
import functools
import gc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from lmlab.errors import CheckpointError
from lmlab.model.config import ModelConfig
from lmlab.tokenization import tokenizer_from_gguf
from lmlab.weights import gguf_quants
from lmlab.weights.build import to_interleaved
from lmlab.gguf_file import GGUFFile

SUPPORTED_ARCHS = ("llama", "qwen2", "gemma3")
ROTATE_HALF_ARCHS = ("qwen2", "gemma3")  # q/k rows stored in Hugging Face's layout (llama.cpp NEOX RoPE)
# per-layer GGUF tensor -> lmlab parameter (".weight" / ".bias" suffixes carry over)
LAYER_NAMES = {
    "attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk",
    "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1", "ffn_up": "feed_forward.w3", "ffn_down": "feed_forward.w2",
    "attn_q_norm": "attention.q_norm", "attn_k_norm": "attention.k_norm",
    "post_attention_norm": "post_attention_norm", "post_ffw_norm": "post_ffn_norm",
}
GEMMA3_PATTERN, GEMMA3_LOCAL_THETA = 6, 10000.0  # llama.cpp's defaults (src/models/gemma3.cpp)
TOP_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
IGNORED = ("rope_freqs",)  # llama.cpp's precomputed RoPE table: lmlab computes its own


@functools.cache
def supported_quant_types() -> list[str]:
    """The tensor types `gguf.quants.dequantize` can turn back into floats."""
    return sorted({"F32", "F16"} | {t.name for t in gguf.quants._type_traits})


def open_gguf(path: str | Path) -> GGUFFile:
    """The file's metadata and tensors (lmlab.gguf_file), file errors as CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (expected a .gguf file)")
    try:
        with gc_paused():
            return GGUFFile(path)
    except (ValueError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable GGUF file ({err}); it may be truncated") from None


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No garbage collection while a file's ~200k small metadata objects are made: the collector's passes
    over them cost more than the parsing itself (measured 3x)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def field(reader: Any, key: str, default: Any = None) -> Any:
    """A metadata value as a Python scalar/str/list, or `default` when absent."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader: Any, path: str | Path) -> ModelConfig:
    """ModelConfig from the `{arch}.*` metadata keys (and the embedding/output tensors)."""
    arch = field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise CheckpointError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {list(SUPPORTED_ARCHS)}"
        )

    def meta(key: str, default: Any = None) -> Any:
        value = field(reader, f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(f"{path}: GGUF metadata key {arch}.{key} is missing")
        if isinstance(value, list):
            raise CheckpointError(f"{path}: {arch}.{key} varies per layer, which lmlab does not support")
        return value

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: GGUF file has no token_embd.weight tensor")
    n_heads, dim = int(meta("attention.head_count")), int(meta("embedding_length"))
    head_dim = int(meta("attention.key_length", dim // n_heads))
    if int(meta("rope.dimension_count", head_dim)) != head_dim:
        raise CheckpointError(
            f"{path}: partial rotary embeddings ({arch}.rope.dimension_count < head size) are not supported"
        )
    scaling, factor = _rope_scaling(reader, arch, path)
    switches = _gemma3_switches(reader, path, meta) if arch == "gemma3" else {}
    return ModelConfig(**{**dict(
        name=str(field(reader, "general.name", Path(path).stem)),
        vocab_size=int(tensors["token_embd.weight"].shape[-1]),  # GGUF shapes are (in, out)
        dim=dim, n_layers=int(meta("block_count")), n_heads=n_heads,
        n_kv_heads=int(meta("attention.head_count_kv", n_heads)), head_dim=head_dim,
        hidden_dim=int(meta("feed_forward_length")), max_seq_len=int(meta("context_length")),
        norm="rmsnorm", norm_eps=_f32(meta("attention.layer_norm_rms_epsilon")),
        pos="rope", rope_theta=_f32(meta("rope.freq_base", 10000.0)), rope_scaling=scaling,
        rope_scaling_factor=factor, mlp="swiglu", qkv_bias="blk.0.attn_q.bias" in tensors,
        out_bias="blk.0.attn_output.bias" in tensors, tie_embeddings="output.weight" not in tensors,
    ), **switches})


def _gemma3_switches(reader: Any, path: str | Path, meta: Any) -> dict[str, Any]:
    """Gemma 3's config switches, read as llama.cpp reads them (src/models/gemma3.cpp)."""
    if field(reader, "gemma3.final_logit_softcapping"):
        raise CheckpointError(f"{path}: gemma3.final_logit_softcapping is not supported")
    n_layers = int(meta("block_count"))
    if n_layers == 62:
        raise CheckpointError(f"{path}: Gemma 3 27B scales attention by 1/sqrt(dim/heads), which lmlab does not "
                              "support (it uses 1/sqrt(head size), as the smaller Gemma 3 models do)")
    switches: dict[str, Any] = dict(mlp="geglu", gelu_approximate="tanh", qk_norm=True, post_norms=True,
                                    scale_embeddings=True)
    window = int(field(reader, "gemma3.attention.sliding_window", 0))
    if window <= 0:
        return switches
    pattern = field(reader, "gemma3.attention.sliding_window_pattern", GEMMA3_PATTERN)
    if isinstance(pattern, list) and all(pattern):  # every layer windowed
        pattern = 0
    elif isinstance(pattern, list):  # one bool per layer, True = windowed
        every = next((k for k in range(1, n_layers + 1)
                      if [bool(i % k < k - 1) for i in range(n_layers)] == [bool(x) for x in pattern]), None)
        if every is None:
            raise CheckpointError(f"{path}: gemma3.attention.sliding_window_pattern {pattern} is not 'every k-th "
                                  "layer global', which is what lmlab supports")
        pattern = every
    theta = _f32(field(reader, "gemma3.rope.freq_base_swa", GEMMA3_LOCAL_THETA))
    return dict(switches, window=window, global_every=int(pattern), rope_local_theta=theta)


def _f32(value: float) -> float:
    """GGUF stores floats as float32: 1e-5 comes back as 9.99999974e-06; keep the shortest spelling."""
    return float(str(np.float32(value)))


def _rope_scaling(reader: Any, arch: str, path: str | Path) -> tuple[str | None, float]:
    kind = field(reader, f"{arch}.rope.scaling.type", "none")
    factor = float(field(reader, f"{arch}.rope.scaling.factor", 1.0))
    if kind == "none" or factor == 1.0:
        return None, 1.0
    if kind == "linear":
        return "linear", factor
    raise CheckpointError(f"{path}: {arch}.rope.scaling.type={kind!r} is not supported; supported: none, linear")


def lmlab_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `layers.3.attention.wq.weight`; None for tensors lmlab skips."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in TOP_NAMES:
        return f"{TOP_NAMES[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_NAMES:
        return f"layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{suffix}"
    if base in IGNORED:
        return None
    raise CheckpointError(f"unknown GGUF tensor {gguf_name!r}")


def interleave_heads(arch: str, name: str, config: ModelConfig) -> int | None:
    """The head count to permute a tensor's rows with (rotate-half -> interleaved), or None to keep it:
    q/k projections of the rotate-half architectures, and their q/k norms (one head's channels)."""
    if arch not in ROTATE_HALF_ARCHS:
        return None
    if name.endswith(("wq.weight", "wq.bias", "wk.weight", "wk.bias")):
        return config.n_heads if ".wq." in name else config.n_kv_heads
    if name.endswith(("q_norm.weight", "k_norm.weight")):
        return 1
    return None


def dequantize_tensor(t: Any) -> torch.Tensor:
    """One tensor of a GGUFFile as an fp32 (or its stored F16/BF16) torch tensor, shaped (out, in)."""
    kind = t.tensor_type.name
    if kind in gguf_quants.FORMATS:
        return gguf_quants.dequantize(torch.from_numpy(t.data), kind)
    if kind in ("F32", "F16"):
        return torch.from_numpy(t.data.copy())  # a copy: parameters must not alias the file's pages
    if kind == "BF16":
        return torch.from_numpy(t.data.copy()).view(torch.bfloat16)
    return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))  # IQ*, TQ*, MXFP4, ...


def gguf_state(
    reader: Any, config: ModelConfig, path: str | Path, dtype: torch.dtype, tensors: list[Any] | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor (or those in `tensors`) dequantized to `dtype`, under lmlab's names (two threads:
    torch's decoding releases the GIL)."""

    arch = field(reader, "general.architecture")
    supported = supported_quant_types()
    tensors = reader.tensors if tensors is None else tensors
    for t in tensors:
        if t.tensor_type.name not in supported:
            raise CheckpointError(
                f"{path}: tensor {t.name} has quantization {t.tensor_type.name}, which cannot be dequantized; "
                f"supported: {supported}"
            )

    def convert(t: Any) -> tuple[str | None, torch.Tensor | None]:
        try:
            name = lmlab_name(t.name)
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from None
        if name is None:
            return None, None
        tensor = dequantize_tensor(t)  # (out, in)
        heads = interleave_heads(arch, name, config)
        if heads:
            tensor = to_interleaved(tensor, heads).contiguous()
        return name, tensor if tensor.dtype == dtype else tensor.to(dtype)

    with ThreadPoolExecutor(2) as pool:
        pairs = list(pool.map(convert, tensors))
    return {name: tensor for name, tensor in pairs if name is not None}


def load_gguf(
    path: str | Path, *, dtype: torch.dtype = torch.float32, with_tokenizer: bool = True
) -> tuple[ModelConfig, dict[str, torch.Tensor], Any]:
    """(config, lmlab state dict in `dtype`, tokenizer or None) from a GGUF file."""
    reader = open_gguf(path)
    config = gguf_config(reader, path)
    state = gguf_state(reader, config, path, dtype)
    tokenizer = gguf_tokenizer(reader) if with_tokenizer else None
    return config, state, tokenizer


def gguf_tokenizer(reader: Any) -> Any:
    """The tokenizer stored in the file's metadata (built by lmlab.tokenization), or None without one."""
    if "tokenizer.ggml.model" not in reader.fields:
        return None
    with gc_paused():
        return tokenizer_from_gguf(reader)
