"""GGUF weights kept quantized (lmlab/weights/gguf_packed.py): every block type equals the `gguf`
package's own dequantizer, on random blocks and on the real SmolLM2 file; the packed-int4 / int8
kernels compute the dequantized weight's matmul; a model loaded with quantize="auto" computes what the
fp32-dequantized model does (and a qwen2 file, whose q/k rows are permuted, too)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

from lmlab.model.quantize import Int4Linear, Int8Embedding, Int8Linear, int4_supported
from lmlab.paths import smollm2_gguf
from lmlab.weights.gguf import open_gguf
from lmlab.weights.gguf_packed import int4_weight, int8_weight
from lmlab.weights.gguf_quants import FORMATS
from lmlab.weights.loading import load_model



def random_blocks(kind: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Valid random blocks of `kind` for a (rows, cols) tensor: random codes, scales of plausible size."""
    rng = np.random.default_rng(seed)
    per, size, _ = FORMATS[kind]
    blocks = rng.integers(0, 256, (rows, cols // per, size), dtype=np.uint8)
    n_f16 = {"Q4_0": 1, "Q4_1": 2, "Q4_K": 2, "Q8_0": 1}[kind]
    scales = rng.uniform(-0.02, 0.02, (rows, cols // per, n_f16)).astype(np.float16)
    if kind in ("Q4_0", "Q8_0", "Q4_K"):
        scales[..., 0] = np.abs(scales[..., 0])  # llama.cpp writes d >= 0 (amax / 127 or / 15)
    blocks[..., : 2 * n_f16] = scales.view(np.uint8).reshape(rows, cols // per, 2 * n_f16)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K"])
def test_int4_blocks_equal_gguf_dequantize(kind: str) -> None:
    blocks = random_blocks(kind, 128, 512)
    ref = dequantize(blocks, gguf.GGMLQuantizationType[kind])
    w = int4_weight(torch.from_numpy(blocks), kind)
    assert w.q.dtype == torch.uint8 and int(w.q.max()) <= 15
    torch.testing.assert_close(w.dequantize(), torch.from_numpy(ref), atol=1e-7, rtol=1e-6)


def test_q8_0_blocks_become_per_row_int8() -> None:
    blocks = random_blocks("Q8_0", 64, 256)
    ref = torch.from_numpy(dequantize(blocks, gguf.GGMLQuantizationType.Q8_0))
    w = int8_weight(torch.from_numpy(blocks), "Q8_0")
    # requantized to one scale per row: within half a step of that scale, and exact where d is the row's max
    assert ((w.dequantize() - ref).abs() <= w.scale[:, None] / 2 + 1e-7).all()
    d = torch.from_numpy(blocks[:, :2].copy().view(np.float16).astype(np.float32))[:, 0]
    exact = d == w.scale  # rows whose first block has the largest scale keep its codes
    codes = torch.from_numpy(blocks[:, 2:34].copy().view(np.int8))
    assert exact.any() and torch.equal(w.q[exact, :32], codes[exact])


def test_real_smollm2_tensors_equal_gguf_dequantize() -> None:
    reader = open_gguf(smollm2_gguf())
    t = next(t for t in reader.tensors if t.name == "blk.7.ffn_up.weight")
    assert t.tensor_type.name == "Q4_1"
    w = int4_weight(torch.from_numpy(np.array(t.data)), "Q4_1")
    ref = torch.from_numpy(dequantize(t.data, t.tensor_type))
    torch.testing.assert_close(w.dequantize(), ref, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K"])
def test_int4_kernel_computes_the_dequantized_matmul(kind: str) -> None:
    if not int4_supported(128, 512):
        pytest.skip("torch's int4 packing on this CPU is not one lmlab knows")
    blocks = random_blocks(kind, 128, 512, seed=1)
    w = torch.from_numpy(dequantize(blocks, gguf.GGMLQuantizationType[kind]))
    layer = Int4Linear(int4_weight(torch.from_numpy(blocks), kind))
    for rows in (1, 8, 40):  # kernel, kernel, dequantized bf16 matmul
        x = torch.randn(rows, 512).bfloat16()
        ref = x.float() @ w.T
        got = layer(x).float()
        # bf16 scale/zero and bf16 output: ~1% of the largest output
        assert (got - ref).abs().max() <= 0.01 * ref.abs().max(), rows


# ---- whole files

def _write(path, hf, arch: str, qtype: str, head_qtype: str | None = None) -> None:
    """A GGUF of a tiny transformers Llama/Qwen2 model in llama.cpp's conventions, linears in `qtype`."""
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    for add, value in ((w.add_block_count, c.num_hidden_layers), (w.add_context_length, c.max_position_embeddings),
                       (w.add_embedding_length, c.hidden_size), (w.add_feed_forward_length, c.intermediate_size),
                       (w.add_head_count, c.num_attention_heads), (w.add_head_count_kv, c.num_key_value_heads),
                       (w.add_layer_norm_rms_eps, c.rms_norm_eps), (w.add_rope_freq_base, 10000.0)):
        add(value)
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, p in hf.state_dict().items():
        a = p.detach().numpy().astype(np.float32)
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        for proj, heads in (("q_proj", c.num_attention_heads), ("k_proj", c.num_key_value_heads)):
            if arch == "llama" and f".{proj}." in name:  # convert_hf_to_gguf.py permutes q/k for llama
                a = a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
        parts = name.split(".")
        if parts[1] == "layers":
            gname = f"blk.{parts[2]}.{names['.'.join(parts[3:-1])]}.{parts[-1]}"
        else:
            gname = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}[
                ".".join(parts[:-1])] + "." + parts[-1]
        kind = head_qtype if gname == "token_embd.weight" and head_qtype else qtype
        if a.ndim == 2 and kind != "F32":
            w.add_tensor(gname, quantize(a, gguf.GGMLQuantizationType[kind]), raw_dtype=gguf.GGMLQuantizationType[kind])
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny(arch: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=256, hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True)
    cls = transformers.LlamaForCausalLM if arch == "llama" else transformers.Qwen2ForCausalLM
    cfg_cls = transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config
    model = cls(cfg_cls(**common))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize(("arch", "qtype"),
                         [("llama", "Q4_0"), ("llama", "Q4_1"), ("qwen2", "Q4_1"), ("llama", "Q8_0")])
def test_auto_quantized_model_computes_the_dequantized_model(arch: str, qtype: str, tmp_path) -> None:
    if not int4_supported(128, 128):
        pytest.skip("torch's int4 packing on this CPU is not one lmlab knows")
    _write(tmp_path / "q.gguf", _tiny(arch), arch, qtype, head_qtype="Q8_0")
    ref = load_model(tmp_path / "q.gguf").model  # every tensor dequantized to fp32
    fast = load_model(tmp_path / "q.gguf", quantize="auto", dtype="bf16").model
    kind = Int8Linear if qtype == "Q8_0" else Int4Linear
    attn, ffn = fast.layers[0].attention, fast.layers[0].feed_forward
    assert type(attn.wqkv) is kind and type(ffn.w13) is kind and type(ffn.w2) is kind
    assert not hasattr(attn, "wq") and not hasattr(ffn, "w1")
    assert isinstance(fast.output, Int8Linear) and isinstance(fast.tok_embeddings, Int8Embedding)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = ref(x), fast(x).float()
        assert (got - want).abs().max() <= 0.03 * want.abs().max()
        want1, got1 = ref(x[:1, :5]), fast(x[:1, :5]).float()  # few rows: the kernels
        assert (got1 - want1).abs().max() <= 0.03 * want1.abs().max()


def test_auto_on_the_real_file_keeps_it_quantized() -> None:
    loaded = load_model("smollm2-135m-instruct", quantize="auto")
    model = loaded.model
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Int4Linear" in kinds and "Int8Embedding" in kinds and "Linear" not in kinds
    assert model.output.qweight.dtype == torch.int8  # the Q8_0 tied embedding is the int8 head
    weight_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    assert weight_bytes < 100e6  # ~0.56 bytes per 4-bit weight, 1 per 8-bit: the file is 98 MB


def test_fast_metadata_parse_equals_gguf_reader() -> None:
    """open_gguf (lmlab.gguf_file's struct walk) reads every field and tensor as gguf.GGUFReader does."""
    ours, stock = open_gguf(smollm2_gguf()), gguf.GGUFReader(smollm2_gguf())
    stock_fields = {k: f for k, f in stock.fields.items() if not k.startswith("GGUF.")}  # header pseudo-fields
    assert list(ours.fields) == list(stock_fields)
    for key, f in stock_fields.items():
        assert ours.fields[key].contents() == f.contents(), key
    assert [(t.name, t.data_offset, t.n_bytes) for t in ours.tensors] == [
        (t.name, t.data_offset, t.n_bytes) for t in stock.tensors]
