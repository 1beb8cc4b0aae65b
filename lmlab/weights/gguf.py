"""GGUF files (llama.cpp's format) with Llama-family architectures: config, weights and tokenizer.

Read with the `gguf` package; every quantized tensor is dequantized with `gguf.quants.dequantize`
(F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1, the K-quants, ...). Supported architectures:
- `llama` (Llama, Mistral, SmolLM, TinyLlama...): llama.cpp's convert_hf_to_gguf.py already permutes
  q/k rows into the interleaved RoPE layout lmlab uses, so tensors map one to one.
- `qwen2`: stored in Hugging Face's rotate-half layout (llama.cpp runs it with NEOX RoPE), so wq/wk and
  their biases are permuted on load, as for a Hugging Face directory.
The tokenizer lives in the file's metadata (`tokenizer.ggml.*`) and is built by lmlab.tokenization.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.errors import CheckpointError
from lmlab.model.config import ModelConfig
from lmlab.tokenization import tokenizer_from_gguf
from lmlab.weights.build import to_interleaved

SUPPORTED_ARCHS = ("llama", "qwen2")
# per-layer GGUF tensor -> lmlab parameter (".weight" / ".bias" suffixes carry over)
LAYER_NAMES = {
    "attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk",
    "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1", "ffn_up": "feed_forward.w3", "ffn_down": "feed_forward.w2",
}
TOP_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
IGNORED = ("rope_freqs",)  # llama.cpp's precomputed RoPE table: lmlab computes its own
_U64 = struct.Struct("<Q")


@functools.cache
def supported_quant_types() -> list[str]:
    """The tensor types `gguf.quants.dequantize` can turn back into floats."""
    import gguf.quants

    return sorted({"F32", "F16"} | {t.name for t in gguf.quants._type_traits})


def open_gguf(path: str | Path) -> Any:
    """A `gguf.GGUFReader` over `path`, with file errors turned into CheckpointError."""
    import gguf

    class _Reader(gguf.GGUFReader):
        """GGUFReader on a plain ndarray view of its memmap: parsing the ~100k tokenizer strings
        slices the map ~250k times, and np.memmap's per-slice bookkeeping made that 3x slower. Arrays
        are parsed in one loop (strings as memoryview slices, numbers as one view) instead of one
        recursive call and three numpy views per element: the same fields, 2.2 s -> 0.15 s here."""

        @property
        def data(self) -> np.ndarray:
            return self._data

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._data = value.view(np.ndarray)

        def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list, list[int], list]:
            if raw_type != gguf.GGUFValueType.ARRAY or self.byte_order != "I":
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._data[orig_offs:orig_offs + 4].view(np.uint32)
            alen = self._data[orig_offs + 4:orig_offs + 12].view(np.uint64)
            itype, n, offs = gguf.GGUFValueType(int(raw_itype[0])), int(alen[0]), orig_offs + 12
            if itype == gguf.GGUFValueType.STRING:
                buf, parts = memoryview(self._data), [raw_itype, alen]
                for _ in range(n):  # each string carries its own length: no way but to walk them
                    (length,) = _U64.unpack_from(buf, offs)
                    parts += (buf[offs:offs + 8], buf[offs + 8:offs + 8 + length])
                    offs += 8 + length
                return offs - orig_offs, parts, list(range(3, len(parts), 2)), [gguf.GGUFValueType.ARRAY, itype]
            nptype = self.gguf_scalar_to_np.get(itype)
            if nptype is None:  # nested arrays
                return super()._get_field_parts(orig_offs, raw_type)
            values = self._data[offs:offs + n * np.dtype(nptype).itemsize].view(nptype)
            return 12 + values.nbytes, [raw_itype, alen, values], [2], [gguf.GGUFValueType.ARRAY, itype]

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (expected a .gguf file)")
    try:
        with gc_paused():
            reader = _Reader(path)
    except (ValueError, KeyError, IndexError, OSError, struct.error) as err:
        raise CheckpointError(f"{path}: not a readable GGUF file ({err}); it may be truncated") from None
    size = len(reader.data)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise CheckpointError(
                f"{path}: truncated GGUF file: tensor {t.name} ends at byte {t.data_offset + t.n_bytes}, "
                f"the file has {size}"
            )
    return reader


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
    return ModelConfig(
        name=str(field(reader, "general.name", Path(path).stem)),
        vocab_size=int(tensors["token_embd.weight"].shape[-1]),  # GGUF shapes are (in, out)
        dim=dim, n_layers=int(meta("block_count")), n_heads=n_heads,
        n_kv_heads=int(meta("attention.head_count_kv", n_heads)), head_dim=head_dim,
        hidden_dim=int(meta("feed_forward_length")), max_seq_len=int(meta("context_length")),
        norm="rmsnorm", norm_eps=_f32(meta("attention.layer_norm_rms_epsilon")),
        pos="rope", rope_theta=_f32(meta("rope.freq_base", 10000.0)), rope_scaling=scaling,
        rope_scaling_factor=factor, mlp="swiglu", qkv_bias="blk.0.attn_q.bias" in tensors,
        out_bias="blk.0.attn_output.bias" in tensors, tie_embeddings="output.weight" not in tensors,
    )


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
    """The head count to permute a tensor's rows with (rotate-half -> interleaved), or None to keep it."""
    if arch == "qwen2" and name.endswith(("wq.weight", "wq.bias", "wk.weight", "wk.bias")):
        return config.n_heads if ".wq." in name else config.n_kv_heads
    return None


def gguf_state(
    reader: Any, config: ModelConfig, path: str | Path, dtype: torch.dtype, tensors: list[Any] | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor (or those in `tensors`) dequantized to `dtype`, under lmlab's names (two threads:
    numpy releases the GIL)."""
    from gguf.quants import dequantize

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
        values = dequantize(t.data, t.tensor_type)  # (out, in) numpy, float32
        if not values.flags.writeable:  # F32 tensors are views of the read-only map
            values = values.copy()
        tensor = torch.from_numpy(values)
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
