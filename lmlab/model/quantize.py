"""Weight-only quantized inference: int8 and packed int4 linears, kept quantized from the file to the matmul.

Batch-1 decoding reads every weight once per token, so its speed is at most memory bandwidth / bytes of
weights: bf16 reads 2 bytes per weight, int8 1 byte plus a scale per output channel, int4 half a byte plus
a bf16 scale and zero per group of 32 inputs (5 bits per weight, as llama.cpp's Q4_1). A GGUF file's
Q4_0 / Q4_1 / Q4_K blocks are all "scale * q + minimum per 32 weights", so they become Int4Linear without
loss (lmlab/weights/gguf_packed.py); Q8_0 becomes Int8Linear. Inference only: quantized modules hold
non-persistent buffers (a state dict of a quantized model holds only its float parts).

Fast paths (each tested equal to the dequantized weight's matmul, tests/test_quantize.py):
- `Int8Linear`: torch's `_weight_int8pack_mm` kernel for up to KERNEL_MAX_ROWS rows on CPU.
- `Int4Linear`: torch's `_weight_int4pack_mm_for_cpu` kernel (w = (q - 8) * scale + zero) for up to
  INT4_KERNEL_MAX_ROWS rows on CPU. Above that (prefill) the kernel re-unpacks the weight for every 4 rows,
  so the weight is unpacked once per call and the dense matmul runs instead.
- Both kernels take bf16 activations whatever the model's dtype (KERNEL_DTYPE: in fp32 they ran 5-12x
  slower on an AVX2 CPU, 23 vs 4.8 ms for SmolLM2's int8 head); a quantized linear casts its input for the
  kernel and its output back. The dense path runs in the model's dtype, except bf16 on a CPU without
  native bf16 dot products (no AVX512-BF16 / AMX: most AMD and older Intel CPUs), where a bf16 GEMM ran
  ~16x slower than fp32 (116 vs 7 ms, 208 x 576 x 960) and fp32 is used instead (`dense_dtype`).
- `fuse_projections`: wq|wk|wv and w1|w3 become one matmul each (one kernel launch and one read of x).
- `Int8Embedding`: a tied embedding reads its rows from the int8 output head (one table, not two).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn

from lmlab.errors import ConfigError
from lmlab.model.attention import Attention
from lmlab.model.transformer import FeedForward
from lmlab.precision import cpu_has_bf16

KERNEL_MAX_ROWS = 16  # int8: above this many rows the dequantized bf16 matmul is faster (measured)
INT4_KERNEL_MAX_ROWS = 16  # int4: the same crossover (benchmarks/generate.py, lmlab/model/quantize.py notes)
GROUP = 32  # inputs per int4 scale/zero: GGUF's block size
INT4_BLOCK = 64  # an int4 weight's output count must be a multiple of this (torch's CPU packing works per 64 rows)
KERNEL_DTYPE = torch.bfloat16  # the CPU kernels' activations and scales
INT8_KERNEL_IN_MULTIPLE = 16  # torch's bf16 int8 kernel reads inputs in vectors: other sizes gave garbage (K=172)
# on an AVX2 CPU; its fp32 variant (5x slower) is right for any size


def dense_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """What a dequantized weight's matmul computes in: `dtype`, but fp32 for bf16 on a CPU that lacks
    native bf16 dot products (a bf16 GEMM there is an emulation, ~16x slower than fp32)."""
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_bf16():
        return torch.float32
    return dtype


@dataclass
class Int8Weight:
    """W = scale[:, None] * q: q int8 (out, in), one scale per output channel."""

    q: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def from_float(cls, w: torch.Tensor) -> "Int8Weight":
        """Symmetric per-channel absmax/127 quantization."""
        w = w.detach().float()
        scale = w.abs().amax(1).clamp_min(1e-12) / 127
        return cls((w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale)

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.float()[:, None]


@dataclass
class Int4Weight:
    """W = scale * q + minimum within each group of GROUP inputs: q uint8 (out, in) in [0, 15], scale and
    minimum (out, in / GROUP). Q4_0 (minimum = -8 scale), Q4_1 and Q4_K all have this form."""

    q: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor

    @classmethod
    def from_float(cls, w: torch.Tensor) -> "Int4Weight":
        """Asymmetric min/max quantization per group of 32 (llama.cpp's Q4_1 rule)."""
        n, k = w.shape
        g = w.detach().float().view(n, k // GROUP, GROUP)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-12)
        q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
        return cls(q.view(n, k), scale, lo)

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        g = self.q.view(n, k // GROUP, GROUP).float()
        return (g * self.scale.float()[..., None] + self.minimum.float()[..., None]).view(n, k)


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T + b with q int8 (out, in) and scale (out,): per-channel symmetric int8."""

    def __init__(self, linear: nn.Linear | Int8Weight, dtype: torch.dtype = torch.bfloat16,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if isinstance(linear, nn.Linear):
            linear, bias = Int8Weight.from_float(linear.weight), linear.bias
        self.register_buffer("qweight", linear.q, persistent=False)
        self.register_buffer("scale", linear.scale.to(dtype), persistent=False)
        # the kernel's dtype and copy of the scales (the same tensor in a bf16 model)
        self.kernel_dtype = KERNEL_DTYPE if linear.q.shape[1] % INT8_KERNEL_IN_MULTIPLE == 0 else torch.float32
        self.register_buffer("kernel_scale", self.scale.to(self.kernel_dtype), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype), persistent=False)
        self.out_features, self.in_features = linear.q.shape

    def _apply(self, fn, recurse: bool = True):
        """model.to(dtype) changes the scales' dtype, not the kernel's copy."""
        super()._apply(fn, recurse)
        if self.kernel_scale.dtype != self.kernel_dtype:
            self.kernel_scale = self.kernel_scale.to(self.kernel_dtype)
        return self

    def uses_kernel(self, rows: int) -> bool:
        """Whether an input of `rows` rows goes through the CPU kernel (else the dense matmul)."""
        return rows <= KERNEL_MAX_ROWS and self.qweight.device.type == "cpu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, self.scale.dtype
        x2 = x.reshape(-1, shape[-1])
        if self.uses_kernel(x2.shape[0]):
            y = torch._weight_int8pack_mm(x2.to(self.kernel_dtype), self.qweight, self.kernel_scale).to(dtype)
        else:
            dense = dense_dtype(dtype, x2.device)
            y = (x2.to(dense) @ (self.qweight.to(dense) * self.scale[:, None].to(dense)).T).to(dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


@dataclass
class PackedInt4:
    """An Int4Weight in the kernel's form: codes in torch's CPU packing (out, in / 2) and (scale, zero)
    pairs (in / 32, out, 2) with w = (q - 8) * scale + zero."""

    qweight: torch.Tensor
    scales_and_zeros: torch.Tensor

    @classmethod
    def from_weight(cls, w: Int4Weight, dtype: torch.dtype) -> "PackedInt4":
        n, k = w.q.shape
        if not int4_supported(n, k):
            raise ConfigError(f"int4 weights need a CPU whose packing lmlab knows, out % {INT4_BLOCK} == 0 and "
                              f"in % {GROUP} == 0; got ({n}, {k})")
        zero = w.minimum.float() + 8 * w.scale.float()
        scales_and_zeros = torch.stack([w.scale.float(), zero], 0).to(dtype).permute(2, 1, 0)  # (in/32, out, 2)
        return cls(pack_int4(w.q), scales_and_zeros.contiguous())

    def rows(self, start: int, stop: int) -> "PackedInt4":
        """Output rows start:stop (multiples of INT4_BLOCK) of a packed concatenation: one packing pass
        serves every layer of one shape (load time), each layer then a contiguous slice of it."""
        return PackedInt4(self.qweight[start:stop], self.scales_and_zeros[:, start:stop].contiguous())


class Int4Linear(nn.Module):
    """y = x @ W^T + b with W stored as 4-bit codes in torch's CPU packing and one (scale, zero) pair per
    group of 32 inputs (PackedInt4), kept in the kernel's bf16 whatever `dtype` (the dtype it takes and
    returns) is: one copy that the kernel and the dense path both read."""

    kernel_dtype = KERNEL_DTYPE  # what the kernel's activations are cast to

    def __init__(self, weight: nn.Linear | Int4Weight | PackedInt4, dtype: torch.dtype = torch.bfloat16,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if isinstance(weight, nn.Linear):
            weight, bias = Int4Weight.from_float(weight.weight), weight.bias
        if isinstance(weight, Int4Weight):
            weight = PackedInt4.from_weight(weight, KERNEL_DTYPE)
        self.dtype = dtype
        self.register_buffer("qweight", weight.qweight, persistent=False)
        self.register_buffer("scales_and_zeros", weight.scales_and_zeros.to(KERNEL_DTYPE), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype), persistent=False)
        self.out_features, self.in_features = weight.scales_and_zeros.shape[1], weight.qweight.shape[1] * 2

    def _apply(self, fn, recurse: bool = True):
        """model.to(dtype) changes the dtype this computes in; the scales stay in the kernel's dtype."""
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype  # what the conversion does to a float tensor
        super()._apply(fn, recurse)
        if self.scales_and_zeros.dtype != KERNEL_DTYPE:
            self.scales_and_zeros = self.scales_and_zeros.to(KERNEL_DTYPE)
        return self

    def uses_kernel(self, rows: int) -> bool:
        """Whether an input of `rows` rows goes through the CPU kernel (else the dense matmul)."""
        return rows <= INT4_KERNEL_MAX_ROWS and self.qweight.device.type == "cpu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.uses_kernel(x2.shape[0]):
            y = torch._weight_int4pack_mm_for_cpu(x2.to(KERNEL_DTYPE), self.qweight, GROUP, self.scales_and_zeros)
        else:
            dense = dense_dtype(self.dtype, x2.device)
            y = x2.to(dense) @ self.dequantized_t(dense)
        y = y.to(self.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def dequantized_t(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W^T (in, out) in `dtype` (default: the compute dtype): what the dense path multiplies by. The codes
        are written straight into the output's (in, out) layout and scaled in place: no temporary of the
        whole weight but one uint8 half (prefill cost 3x less than unpacking, then converting, then scaling)."""
        k, n = self.in_features, self.out_features
        block, pairs = _int4_layout()
        packed = self.qweight.view(n // block, k, block // 2)
        out = torch.empty(k, n, dtype=dtype or self.dtype, device=packed.device)
        blocks = out.view(k, n // block, block // 2, 2) if pairs else out.view(k, n // block, 2, block // 2)
        low, high = (blocks[..., 0], blocks[..., 1]) if pairs else (blocks[:, :, 0], blocks[:, :, 1])
        low.copy_((packed & 15).permute(1, 0, 2))
        high.copy_((packed >> 4).permute(1, 0, 2))
        scale, zero = self.scales_and_zeros.float().unbind(-1)  # (in/32, out)
        groups = out.view(k // GROUP, GROUP, n)
        groups.mul_(scale[:, None].to(out.dtype)).add_((zero - 8 * scale)[:, None].to(out.dtype))
        return out


# ---- torch's CPU int4 packing (aten/src/ATen/native/cpu/int4mm_kernel.cpp, weight_to_int4pack_kernel):
# rows are packed in blocks of 64 (AVX512) or 32 (AVX2, scalar); for each input k a block holds its rows'
# codes as bytes (row d + block/2 in the high nibble, row d in the low one; the scalar kernel pairs rows
# 2j, 2j+1 instead). Packing here (no int32 copy of the codes) is checked against torch's own converter.

@functools.cache
def _int4_layout() -> tuple[int, bool] | None:
    """(rows per block, pairs) of this CPU's int4 packing, found by packing a probe; None if unknown."""
    n, k = INT4_BLOCK, 2 * GROUP
    codes = ((torch.arange(n)[:, None] * 7 + torch.arange(k) * 3) % 16).to(torch.uint8)
    try:
        packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    except RuntimeError:
        return None
    for layout in ((64, False), (32, False), (32, True)):
        if torch.equal(_pack(codes, *layout), packed):
            return layout
    return None


def int4_supported(out_features: int, in_features: int) -> bool:
    """Whether a (out, in) weight can be an Int4Linear on this machine."""
    return _int4_layout() is not None and out_features % INT4_BLOCK == 0 and in_features % GROUP == 0


def _pack(q: torch.Tensor, block: int, pairs: bool) -> torch.Tensor:
    n, k = q.shape
    v = q.view(n // block, block // 2, 2, k) if pairs else q.view(n // block, 2, block // 2, k)
    lo, hi = (v[:, :, 0], v[:, :, 1]) if pairs else (v[:, 0], v[:, 1])  # (n / block, block / 2, k)
    return (lo | (hi << 4)).transpose(1, 2).contiguous().view(n, k // 2)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes (out, in) in [0, 15] -> torch's packed CPU layout (out, in / 2)."""
    return _pack(q.to(torch.uint8), *_int4_layout())


def unpack_int4(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of pack_int4, transposed: codes (in, out) uint8, the layout the dense matmul reads."""
    block, pairs = _int4_layout()
    v = packed.view(out_features // block, in_features, block // 2)
    lo, hi = v & 15, v >> 4
    codes = torch.stack([lo, hi], -1).flatten(-2) if pairs else torch.cat([lo, hi], -1)  # (n/block, k, block)
    return codes.permute(1, 0, 2).reshape(in_features, out_features)


# ---- whole-model transforms

class Int8Embedding(nn.Module):
    """Embedding rows read from a tied Int8Linear output head: q[ids] * scale[ids]."""

    def __init__(self, table: Int8Linear) -> None:
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.table
        return t.qweight[ids].to(t.scale.dtype) * t.scale[ids, None]


def linear_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a linear layer (plain, LoRA or quantized) computes in: what its input should be."""
    if isinstance(module, Int8Linear):
        return module.scale.dtype
    if isinstance(module, Int4Linear):
        return module.dtype
    return module.weight.dtype


def quantized_linear(weight: Int4Weight | PackedInt4 | Int8Weight, dtype: torch.dtype,
                     bias: torch.Tensor | None = None) -> nn.Module:
    return (Int8Linear if isinstance(weight, Int8Weight) else Int4Linear)(weight, dtype, bias)


def _replace_linears(model: nn.Module, make) -> nn.Module:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, make(child))
    return model.eval()


def quantize_int8(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every nn.Linear (attention, FFN, output head) by Int8Linear, in place; returns the model.

    A tied output head gets its own int8 copy; the embedding table stays in `dtype` for lookups.
    """
    if dtype not in (torch.bfloat16, torch.float32):
        raise ConfigError(f"int8 quantization computes in bf16 or fp32, not {dtype}")
    model.to(dtype)
    return _replace_linears(model, lambda lin: Int8Linear(lin, dtype))


def quantize_int4(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every nn.Linear whose shape int4 packing allows by Int4Linear (min/max per 32 inputs), the
    others (and the output head, which reads the most bytes but hurts quality the most) by Int8Linear."""
    if dtype not in (torch.bfloat16, torch.float32):
        raise ConfigError(f"int4 quantization computes in bf16 or fp32, not {dtype}")
    model.to(dtype)
    head = getattr(model, "output", None)

    def make(lin: nn.Linear) -> nn.Module:
        if lin is not head and int4_supported(lin.out_features, lin.in_features):
            return Int4Linear(lin, dtype)
        return Int8Linear(lin, dtype)

    return _replace_linears(model, make)


def _fusable(parts: list[nn.Module]) -> bool:
    return all(type(p) is nn.Linear for p in parts) and len({p.bias is None for p in parts}) == 1


def _fused_linear(parts: list[nn.Linear]) -> nn.Linear:
    """One nn.Linear computing cat([p(x) for p in parts], -1) (frozen: inference only)."""
    weight = torch.cat([p.weight.detach() for p in parts])
    fused = nn.Linear(parts[0].in_features, weight.shape[0], bias=parts[0].bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if parts[0].bias is not None:
        fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
    return fused


def fuse_projections(model: nn.Module) -> nn.Module:
    """Inference: wq|wk|wv -> attention.wqkv and w1|w3 -> feed_forward.w13, one matmul each (the model's
    forward uses them when set). Run before quantize_int8 / quantize_int4: quantizing the fused weight
    gives the same codes as quantizing the parts (scales are per output row)."""
    for module in model.modules():
        if isinstance(module, Attention) and module.wqkv is None and _fusable([module.wq, module.wk, module.wv]):
            module.wqkv = _fused_linear([module.wq, module.wk, module.wv])
            del module.wq, module.wk, module.wv
        elif isinstance(module, FeedForward) and module.swiglu and module.w13 is None \
                and _fusable([module.w1, module.w3]):
            module.w13 = _fused_linear([module.w1, module.w3])
            del module.w1, module.w3
    return model


FUSED = {"wqkv": ("wq", "wk", "wv"), "w13": ("w1", "w3")}  # fused module -> the parts it replaces


def install_quantized(model: nn.Module, weights: dict[str, Int4Weight | PackedInt4 | Int8Weight],
                      state: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """Put quantized linears in the model at the weights' names (`layers.0.attention.wqkv.weight` replaces
    wq, wk and wv), taking their biases out of `state`; a tied embedding whose head is int8 reads its rows
    from it. Returns the model."""
    for name, weight in weights.items():
        path = name.removesuffix(".weight")
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, leaf, quantized_linear(weight, dtype, state.pop(f"{path}.bias", None)))
        for part in FUSED.get(leaf, ()):
            delattr(parent, part)
    if model.config.tie_embeddings and isinstance(model.output, Int8Linear):
        model.tok_embeddings = Int8Embedding(model.output)
    return model
