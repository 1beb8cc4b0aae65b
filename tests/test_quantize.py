"""Weight-only int8 inference: the kernel path and the dequantized path compute the same product."""

from __future__ import annotations

import torch
import torch.nn as nn

from lmlab.generation.generate import GenerationConfig, generate_ids
from lmlab.generation.sampling import SamplingConfig
from lmlab.model.config import ModelConfig
from lmlab.model.quantize import KERNEL_MAX_ROWS, Int8Linear, quantize_int8
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
