"""Weight-only int8 inference: the decode step reads half the bytes of bf16.

Generation at small batch is bound by memory bandwidth (every weight is read once per token), so
storing each linear's weight as int8 with one bf16 scale per output channel (symmetric, absmax/127)
cuts the bytes per token in two; torch's `_weight_int8pack_mm` kernel multiplies without
dequantizing. It wins for a few rows at a time (decode: measured 6x per 1536x576 matmul at batch 1,
1.7x at batch 8 on the AVX512 CPU here) and loses for many (prefill), where the weight is dequantized
on the fly instead. Inference only: quantized modules hold buffers, not parameters.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lmlab.errors import ConfigError

KERNEL_MAX_ROWS = 16  # above this many rows the dequantized bf16 matmul is faster (measured)


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T + b with q int8 (out, in) and scale (out,): per-channel symmetric int8."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(1).clamp_min(1e-12) / 127
        self.register_buffer("qweight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))
        bias = linear.bias.detach().to(dtype) if linear.bias is not None else None
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.scale.dtype)
        if x2.shape[0] <= KERNEL_MAX_ROWS and x2.device.type == "cpu":
            y = torch._weight_int8pack_mm(x2, self.qweight, self.scale)
        else:
            y = x2 @ (self.qweight.to(x2.dtype) * self.scale[:, None]).T
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


def quantize_int8(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every nn.Linear (attention, FFN, output head) by Int8Linear, in place; returns the model.

    A tied output head gets its own int8 copy; the embedding table stays in `dtype` for lookups.
    """
    if dtype not in (torch.bfloat16, torch.float32):
        raise ConfigError(f"int8 quantization computes in bf16 or fp32, not {dtype}")
    model.to(dtype)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Int8Linear(child, dtype))
    return model.eval()
