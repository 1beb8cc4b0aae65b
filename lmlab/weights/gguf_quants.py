"""llama.cpp's block quantization formats (ggml-common.h, ggml-quants.c) decoded in torch.

Every type here is affine per group of weights: w = scale * q + offset, with q small integers and one
scale (and, for the asymmetric types, one offset) per group of 32 weights (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
Q4_K, Q5_K) or 16 (Q2_K, Q3_K, Q6_K). The K-quants ("super-blocks" of 256, llama.cpp PR 1684) store
each group's scale and minimum as 4- or 6-bit integers times one fp16 scale per super-block.

`unpack(raw, type)` returns that decomposition, (q, scale, offset), so a packed low-bit matmul can take
the integers and group scales as they are; `dequantize` multiplies it out in fp32. The products of an
fp16 scale and a few-bit integer are exact in fp32, so the result equals `gguf.quants.dequantize`
(the gguf package's numpy reference) bit for bit (tests/test_gguf_quants.py). Compared with the numpy
reference this runs on torch's threads, without float64 temporaries, on any device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

QK_K = 256  # elements per K-quant super-block


class Unpacked(NamedTuple):
    """w = q * scale (+ offset), per group: q (n_groups, group) int8/uint8, scale/offset (n_groups, 1) fp32."""

    q: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None


def _f16(raw: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 stored at byte `at` of every block, as (n_blocks, 1) fp32."""
    return raw[:, at:at + 2].contiguous().view(torch.float16).float()


def _shifted(x: torch.Tensor, shifts: tuple[int, ...], width: int) -> torch.Tensor:
    """x (n, ..., k) uint8 -> (n, ..., len(shifts), k): the `width`-bit field at each shift."""
    s = torch.tensor(shifts, dtype=torch.uint8, device=x.device).view(len(shifts), 1)
    return (x.unsqueeze(-2) >> s) & ((1 << width) - 1)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32) bits, bit j first for element j."""
    return _shifted(qh, tuple(range(8)), 1).transpose(-1, -2).reshape(qh.shape[0], 32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 16) bytes -> (n, 32): the low nibbles are elements 0..15, the high ones 16..31."""
    return _shifted(qs, (0, 4), 4).reshape(qs.shape[0], 32)


# ---- the legacy types: one fp16 scale (and minimum) per 32 weights

def _q4_0(raw: torch.Tensor) -> Unpacked:  # d, qs[16]
    return Unpacked(_nibbles(raw[:, 2:18]).to(torch.int8) - 8, _f16(raw, 0), None)


def _q4_1(raw: torch.Tensor) -> Unpacked:  # d, m, qs[16]
    return Unpacked(_nibbles(raw[:, 4:20]), _f16(raw, 0), _f16(raw, 2))


def _q5_0(raw: torch.Tensor) -> Unpacked:  # d, qh[4], qs[16]
    q = _nibbles(raw[:, 6:22]) | (_bits32(raw[:, 2:6]) << 4)
    return Unpacked(q.to(torch.int8) - 16, _f16(raw, 0), None)


def _q5_1(raw: torch.Tensor) -> Unpacked:  # d, m, qh[4], qs[16]
    return Unpacked(_nibbles(raw[:, 8:24]) | (_bits32(raw[:, 4:8]) << 4), _f16(raw, 0), _f16(raw, 2))


def _q8_0(raw: torch.Tensor) -> Unpacked:  # d, qs[32] int8
    return Unpacked(raw[:, 2:34].contiguous().view(torch.int8), _f16(raw, 0), None)


# ---- the K-quants: 256 weights per super-block, integer sub-scales times fp16 super-scales

def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> eight 6-bit scales and eight 6-bit minimums (ggml get_scale_min_k4)."""
    d, m, md = scales.reshape(-1, 3, 4).unbind(1)
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _groups(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, group: int) -> Unpacked:
    """Flatten per-super-block fields to one row per group of `group` weights."""
    n = q.shape[0] * QK_K // group
    return Unpacked(q.reshape(n, group), scale.reshape(n, 1), None if offset is None else offset.reshape(n, 1))


def _q2_k(raw: torch.Tensor) -> Unpacked:  # scales[16] (scale | min << 4), qs[64], d, dmin
    sc = raw[:, :16]
    q = _shifted(raw[:, 16:80].reshape(-1, 2, 32), (0, 2, 4, 6), 2)  # (n, 2, 4, 32)
    return _groups(q, _f16(raw, 80) * (sc & 0xF).float(), -(_f16(raw, 82) * (sc >> 4).float()), 16)


def _q3_k(raw: torch.Tensor) -> Unpacked:  # hmask[32], qs[64], scales[12], d
    low, high = raw[:, 96:104], raw[:, 104:108]
    sc = (_shifted(low, (0, 4), 4).reshape(-1, 16) | (_shifted(high, (0, 2, 4, 6), 2).reshape(-1, 16) << 4))
    ql = _shifted(raw[:, 32:96].reshape(-1, 2, 32), (0, 2, 4, 6), 2).to(torch.int8)  # (n, 2, 4, 32)
    hm = _shifted(raw[:, :32], tuple(range(8)), 1).to(torch.int8)  # (n, 8, 32); a clear bit subtracts 4
    q = ql.reshape(-1, 8, 32) - ((1 - hm) << 2)
    return _groups(q, _f16(raw, 108) * (sc.to(torch.int8) - 32).float(), None, 16)


def _q4_k(raw: torch.Tensor) -> Unpacked:  # d, dmin, scales[12], qs[128]
    sc, mn = _scale_min_k4(raw[:, 4:16])
    q = _shifted(raw[:, 16:144].reshape(-1, 4, 32), (0, 4), 4)  # (n, 4, 2, 32)
    return _groups(q, _f16(raw, 0) * sc.float(), -(_f16(raw, 2) * mn.float()), 32)


def _q5_k(raw: torch.Tensor) -> Unpacked:  # d, dmin, scales[12], qh[32], qs[128]
    sc, mn = _scale_min_k4(raw[:, 4:16])
    ql = _shifted(raw[:, 48:176].reshape(-1, 4, 32), (0, 4), 4).reshape(-1, 8, 32)
    q = ql | (_shifted(raw[:, 16:48], tuple(range(8)), 1) << 4)
    return _groups(q, _f16(raw, 0) * sc.float(), -(_f16(raw, 2) * mn.float()), 32)


def _q6_k(raw: torch.Tensor) -> Unpacked:  # ql[128], qh[64], scales[16] int8, d
    ql = _shifted(raw[:, :128].reshape(-1, 2, 64), (0, 4), 4).reshape(-1, 8, 32)
    qh = _shifted(raw[:, 128:192].reshape(-1, 2, 32), (0, 2, 4, 6), 2).reshape(-1, 8, 32)
    q = (ql | (qh << 4)).to(torch.int8) - 32
    scale = _f16(raw, 208) * raw[:, 192:208].contiguous().view(torch.int8).float()
    return _groups(q, scale, None, 16)


# type name -> (weights per block, bytes per block, decoder)
FORMATS: dict[str, tuple[int, int, Callable[[torch.Tensor], Unpacked]]] = {
    "Q4_0": (32, 18, _q4_0), "Q4_1": (32, 20, _q4_1), "Q5_0": (32, 22, _q5_0), "Q5_1": (32, 24, _q5_1),
    "Q8_0": (32, 34, _q8_0), "Q2_K": (QK_K, 84, _q2_k), "Q3_K": (QK_K, 110, _q3_k),
    "Q4_K": (QK_K, 144, _q4_k), "Q5_K": (QK_K, 176, _q5_k), "Q6_K": (QK_K, 210, _q6_k),
}


def unpack(raw: torch.Tensor, qtype: str) -> Unpacked:
    """Raw blocks (any shape of uint8 whose size is a whole number of blocks) -> (q, scale, offset),
    one row per group, groups in storage order."""
    block, size, decode = FORMATS[qtype]
    if raw.dtype != torch.uint8 or raw.numel() % size:
        raise ValueError(f"{qtype}: expected uint8 data in whole blocks of {size} bytes, got {raw.dtype} "
                         f"with {raw.numel()} elements")
    return decode(raw.reshape(-1, size))


def dequantize(raw: torch.Tensor, qtype: str) -> torch.Tensor:
    """Raw rows (..., bytes per row) uint8 -> (..., weights per row) fp32."""
    block, size, _ = FORMATS[qtype]
    q, scale, offset = unpack(raw, qtype)
    w = q.float() * scale
    if offset is not None:
        w = w + offset
    return w.reshape(*raw.shape[:-1], raw.shape[-1] // size * block)


__all__ = ["FORMATS", "QK_K", "Unpacked", "dequantize", "unpack"]
