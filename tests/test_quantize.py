"""Weight-only int8 / int4 inference: the kernel paths and the dequantized paths compute the same product;
lmlab packs int4 exactly as torch does; fused projections compute what the separate ones did."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lmlab.generation.generate import GenerationConfig, generate_ids
from lmlab.generation.sampling import SamplingConfig
from lmlab.model.config import ModelConfig
from lmlab.model.quantize import (
    INT4_KERNEL_MAX_ROWS,
    KERNEL_MAX_ROWS,
    Int4Linear,
    Int4Weight,
    Int8Linear,
    fuse_projections,
    int4_supported,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from lmlab.model.transformer import Transformer


def test_int8_linear_matches_dequantized_weight() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=True)
    q = Int8Linear(lin)
    deq = q.qweight.float() * q.scale.float()[:, None]
    # per row: half a quantization step, plus the bf16 rounding of the scale times |q| <= 127
    bound = q.scale.float()[:, None] * (0.5 + 127 * 2**-8)
    assert ((deq - lin.weight).abs() <= bound).all()
    for rows in (1, KERNEL_MAX_ROWS, KERNEL_MAX_ROWS + 9):  # kernel path and dequantized path
        x = torch.randn(rows, 64)
        ref = x @ deq.T + lin.bias
        torch.testing.assert_close(q(x.bfloat16()).float(), ref, atol=0.05, rtol=0.02)


def test_quantized_model_stays_close_and_generates() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    model = Transformer(cfg).eval()
    x = torch.randint(0, 50, (2, 12))
    ref = model(x)
    quant = quantize_int8(_copy(model), torch.float32)
    assert not any(type(m) is nn.Linear for m in quant.modules())
    err = (quant(x) - ref).abs().max() / ref.abs().max()
    assert err < 0.02
    out = generate_ids(quant, [[1, 2, 3]], GenerationConfig(5, SamplingConfig(temperature=0)))[0]
    assert len(out) == 5


def _copy(model: Transformer) -> Transformer:
    clone = Transformer(model.config).eval()
    clone.load_state_dict(model.state_dict())
    return clone


needs_int4 = pytest.mark.skipif(not int4_supported(64, 64),
                                reason="torch's int4 packing on this CPU is not one lmlab knows")


@needs_int4
def test_int4_packing_is_torchs_and_unpacks() -> None:
    for n, k in ((64, 64), (192, 576), (960, 96)):
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
        packed = pack_int4(q)
        assert torch.equal(packed, torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
        assert torch.equal(unpack_int4(packed, n, k), q.T)


@needs_int4
def test_int4_linear_matches_dequantized_weight() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(128, 192, bias=True)
    w = Int4Weight.from_float(lin.weight)
    assert ((w.dequantize() - lin.weight).abs() <= w.scale.repeat_interleave(32, 1) / 2 + 1e-6).all()
    q = Int4Linear(lin)
    deq = w.dequantize()
    for rows in (1, INT4_KERNEL_MAX_ROWS, INT4_KERNEL_MAX_ROWS + 9, 64):  # kernel path and dequantized path
        x = torch.randn(rows, 128).bfloat16()
        ref = x.float() @ deq.T + lin.bias
        torch.testing.assert_close(q(x).float(), ref, atol=0.05, rtol=0.02)


def test_fused_projections_compute_the_same() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, qkv_bias=True)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    x = torch.randint(0, 50, (2, 12))
    ref = model(x)
    fused = fuse_projections(_copy(model))
    assert fused.layers[0].attention.wqkv.weight.shape == (64 + 2 * 32, 64)
    assert not hasattr(fused.layers[0].attention, "wq") and not hasattr(fused.layers[0].feed_forward, "w1")
    torch.testing.assert_close(fused(x), ref, atol=1e-5, rtol=1e-5)


@needs_int4
def test_int4_model_stays_close_and_generates() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=32)
    model = Transformer(cfg).eval()
    x = torch.randint(0, 64, (2, 12))
    ref = model(x)
    quant = quantize_int4(fuse_projections(_copy(model)))
    assert type(quant.layers[0].feed_forward.w13) is Int4Linear and type(quant.output) is Int8Linear
    err = (quant(x).float() - ref).abs().max() / ref.abs().max()
    assert err < 0.1  # 4-bit weights of a random model
    out = generate_ids(quant, [[1, 2, 3]], GenerationConfig(5, SamplingConfig(temperature=0)))[0]
    assert len(out) == 5


@pytest.mark.parametrize("in_features", [172, 176])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_linear_of_any_input_size_matches_dequantized_weight(in_features: int, dtype: torch.dtype) -> None:
    """torch's bf16 int8 kernel gave garbage for 172 inputs (stories260K's FFN) on an AVX2 CPU: such sizes
    take its fp32 variant; both kernel paths and the dense one compute the dequantized product."""
    torch.manual_seed(0)
    q = Int8Linear(nn.Linear(in_features, 64, bias=False), dtype)
    deq = q.qweight.float() * q.scale.float()[:, None]
    for rows in (1, 5, KERNEL_MAX_ROWS + 3):
        x = torch.randn(rows, in_features).to(dtype)
        y = q(x)
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), x.float() @ deq.T, atol=0.05, rtol=0.02)


@needs_int4
def test_int4_linear_computes_in_the_models_dtype_with_bf16_scales() -> None:
    """The kernel takes bf16 activations and scales whatever the model's dtype (fp32 on a CPU without native
    bf16); the layer returns its dtype, model.to(dtype) changes it and leaves the scales bf16; the dense
    path's dequantized weight is the codes' (q - 8) * scale + zero."""
    torch.manual_seed(0)
    q = Int4Linear(nn.Linear(128, 192, bias=False), torch.float32)
    assert q.scales_and_zeros.dtype == torch.bfloat16
    scale, zero = q.scales_and_zeros.float().unbind(-1)
    codes = unpack_int4(q.qweight, 192, 128).float().view(4, 32, 192)
    want = ((codes - 8) * scale[:, None] + zero[:, None]).view(128, 192)
    assert torch.equal(q.dequantized_t(torch.float32), want)
    for rows in (1, INT4_KERNEL_MAX_ROWS + 9):
        x = torch.randn(rows, 128)
        y = q(x)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, x @ want, atol=0.05, rtol=0.02)
    q.to(torch.bfloat16)
    assert q.dtype == torch.bfloat16 and q.scales_and_zeros.dtype == torch.bfloat16
    assert q(torch.randn(2, 128).bfloat16()).dtype == torch.bfloat16
