"""GGUF weights kept quantized from the file to the matmul (`load_model(..., quantize="auto")`).

llama.cpp's 4-bit blocks all store "scale * q + minimum" per group of 32 weights, which is exactly what
lmlab.model.quantize.Int4Linear computes with, so they are repacked, never dequantized:
- Q4_0: 32 codes and a fp16 d per block; w = d * (q - 8)             -> scale d, minimum -8 d
- Q4_1: 32 codes, fp16 d and m;           w = d * q + m                -> scale d, minimum m
- Q4_K: super-blocks of 256 with fp16 d, dmin and 6-bit scale sc / min mn for each of 8 sub-blocks
        of 32;                            w = d * sc * q - dmin * mn   -> scale d sc, minimum -dmin mn
(ggml-quants.c, dequantize_row_q4_0/q4_1/q4_K; the gguf package's quants.py.)
Q8_0 (int8 codes, a fp16 scale per 32) becomes int8 with one scale per output row, the layout of torch's
int8 kernel: a requantization, with under half of Q8_0's own error. Other quantized types (Q5_*, Q6_K,
Q2_K, Q3_K) are dequantized and stored as per-row int8, which reads fewer bytes than floats and adds
less error than those formats have; F32/F16/BF16 weights stay floats. Per-tensor choice, in `plan`.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from gguf import GGMLQuantizationType

from lmlab.errors import CheckpointError
from lmlab.model.config import ModelConfig
from lmlab.model.quantize import FUSED, Int4Weight, Int8Weight, PackedInt4, int4_supported
from lmlab.weights import gguf_quants
from lmlab.weights.build import to_interleaved
from lmlab.weights.gguf import (
    field,
    gc_paused,
    gguf_config,
    gguf_state,
    gguf_tokenizer,
    interleave_heads,
    lmlab_name,
    open_gguf,
    supported_quant_types,
)

INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
FLOAT_TYPES = ("F32", "F16", "BF16")


def _rows(t: Any, heads: int | None) -> torch.Tensor:
    """The tensor's blocks as a uint8 torch view of the memory map, one row per output (read, never
    written), rows permuted rotate-half -> interleaved when `heads` is given (the blocks of a row move
    together, so no value changes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "array is not writable": it is only read
        rows = torch.from_numpy(t.data)
    return to_interleaved(rows, heads) if heads else rows


def int4_weight(rows: torch.Tensor, kind: str) -> Int4Weight:
    """Q4_0 / Q4_1 / Q4_K rows (out, bytes) as codes, scale and minimum per 32 weights (no rounding):
    lmlab.weights.gguf_quants' (q, scale, offset), with Q4_0's signed codes shifted to [0, 15]."""
    n = rows.shape[0]
    q, scale, offset = gguf_quants.unpack(rows, kind)
    if offset is None:  # Q4_0: q in [-8, 7], w = d q = d (q + 8) - 8 d
        q, offset = q + 8, -8 * scale
    return Int4Weight(q.to(torch.uint8).reshape(n, -1), scale.reshape(n, -1), offset.reshape(n, -1))


def int8_weight(rows: torch.Tensor, kind: str) -> Int8Weight:
    """Quantized rows as per-row int8. Q8_0 from its codes: the row's scale is its largest block scale
    |d|_max, and q' = round(q * d / |d|_max) (blocks with d = |d|_max keep their codes exactly). Other
    types are dequantized (lmlab.weights.gguf_quants, or gguf's decoder for the rarer ones) and rounded."""
    n = rows.shape[0]
    if kind == "Q8_0":
        q, d, _ = gguf_quants.unpack(rows, kind)  # (out * blocks, 32), (out * blocks, 1)
        d = d.view(n, -1)
        scale = d.abs().amax(-1).clamp_min(1e-12)
        q = q.view(n, -1, 32).float().mul_((d / scale[:, None])[..., None])
        return Int8Weight(q.round_().to(torch.int8).view(n, -1), scale)
    if kind in gguf_quants.FORMATS:
        return Int8Weight.from_float(gguf_quants.dequantize(rows, kind))
    from gguf.quants import dequantize

    return Int8Weight.from_float(torch.from_numpy(dequantize(rows.numpy(), GGMLQuantizationType[kind])))


def plan(t: Any, name: str, config: ModelConfig) -> str:
    """How to keep one tensor: 'int4', 'int8' or 'float' (norms, biases, float files, embeddings, and
    types nothing can read, which gguf_state then reports)."""
    kind = t.tensor_type.name
    if kind not in supported_quant_types():
        return "float"
    linear = name.endswith(".weight") and len(t.shape) == 2 and name != "tok_embeddings.weight"
    if name == "tok_embeddings.weight" and config.tie_embeddings:
        linear = True  # it is also the output head: quantize it as the head
    if not linear or kind in FLOAT_TYPES:
        return "float"
    out_features, in_features = int(t.shape[1]), int(t.shape[0])  # GGUF shapes are (in, out)
    return "int4" if kind in INT4_TYPES and int4_supported(out_features, in_features) else "int8"


def _groups(planned: dict[str, tuple[Any, str]]) -> list[tuple[str, list[str]]]:
    """(destination weight, source weights): wq|wk|wv -> wqkv and w1|w3 -> w13 where all parts are of one
    GGUF type and plan (their blocks are then concatenated as rows), every other weight alone."""
    groups, used = [], set()
    for name in planned:
        path, _, leaf = name.removesuffix(".weight").rpartition(".")
        for fused, parts in FUSED.items():
            names = [f"{path}.{p}.weight" for p in parts]
            kinds = {(planned[n][0].tensor_type, planned[n][1]) if n in planned else None for n in names}
            if leaf == parts[0] and len(kinds) == 1 and None not in kinds:
                groups.append((f"{path}.{fused}.weight", names))
                used.update(names)
    return groups + [(name, [name]) for name in planned if name not in used]


# File bytes converted in one pass: large enough for few ops (not ~10 per tensor), small enough that the
# temporaries are recycled by malloc instead of mapped afresh (a new page costs ~6 us in this VM).
BATCH_BYTES = 2 << 20


def _batches(groups: list[tuple[str, list[str]]], planned: dict[str, tuple[Any, str]]
             ) -> list[list[tuple[str, list[str]]]]:
    """Groups of one (plan, GGUF type, input size) gathered into batches of about BATCH_BYTES."""
    by_kind: dict[tuple, list[list]] = {}
    for group in groups:
        t, how = planned[group[1][0]]
        batches = by_kind.setdefault((how, t.tensor_type, int(t.shape[0])), [[]])
        if sum(planned[p][0].n_bytes for g in batches[-1] for p in g[1]) > BATCH_BYTES:
            batches.append([])
        batches[-1].append(group)
    return [batch for batches in by_kind.values() for batch in batches]


def load_gguf_quantized(
    path: str | Path, *, dtype: torch.dtype = torch.bfloat16, with_tokenizer: bool = True
) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, PackedInt4 | Int8Weight], Any]:
    """(config, float tensors (norm weights in fp32, the rest in `dtype`), quantized linear weights
    (wq|wk|wv and w1|w3 fused where they are of one kind), tokenizer or None). A tied embedding comes back as the quantized `output.weight`.

    The tokenizer is built in a second thread meanwhile (it holds the GIL; torch's conversions do not)."""
    reader = open_gguf(path)
    config = gguf_config(reader, path)
    arch = field(reader, "general.architecture")
    floats, planned = [], {}
    for t in reader.tensors:
        try:
            name = lmlab_name(t.name)
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from None
        how = "float" if name is None else plan(t, name, config)
        if how == "float" or (how == "int4" and name == "tok_embeddings.weight"):
            floats.append(t)  # (a tied int4 head keeps a float table for the embedding lookups)
        if how != "float":
            planned["output.weight" if name == "tok_embeddings.weight" else name] = (t, how)

    def convert(batch: list[tuple[str, list[str]]]) -> dict[str, PackedInt4 | Int8Weight]:
        parts = [p for _, names in batch for p in names]
        rows = torch.cat([_rows(planned[p][0], interleave_heads(arch, p, config)) for p in parts])
        t, how = planned[parts[0]]
        sizes = [sum(int(planned[p][0].shape[1]) for p in names) for _, names in batch]
        ends = torch.tensor(sizes).cumsum(0).tolist()
        if how == "int4":
            packed = PackedInt4.from_weight(int4_weight(rows, t.tensor_type.name), dtype)
            return {name: packed.rows(end - n, end) for (name, _), n, end in zip(batch, sizes, ends)}
        w = int8_weight(rows, t.tensor_type.name)
        return {name: Int8Weight(w.q[end - n:end], w.scale[end - n:end])
                for (name, _), n, end in zip(batch, sizes, ends)}

    groups = _groups(planned)
    with ThreadPoolExecutor(1) as pool, gc_paused():
        tokenizer = pool.submit(gguf_tokenizer, reader) if with_tokenizer else None
        weights = {k: v for batch in _batches(groups, planned) for k, v in convert(batch).items()}
        state = gguf_state(reader, config, path, torch.float32, tensors=floats)
        state = {k: v if k.endswith("norm.weight") else v.to(dtype) for k, v in state.items()}  # norms stay fp32
        tokenizer = tokenizer.result() if tokenizer else None
    for name, parts in groups:  # biases of fused projections, concatenated the same way
        biases = [p.removesuffix("weight") + "bias" for p in parts]
        if len(parts) > 1 and biases[0] in state:
            state[name.removesuffix("weight") + "bias"] = torch.cat([state.pop(b) for b in biases])
    return config, state, weights, tokenizer
