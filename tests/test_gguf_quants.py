"""GGUF block decoding (lmlab.weights.gguf_quants) equals the gguf package's `gguf.quants.dequantize`
bit for bit, on real blocks of every type:
- Q4_K, Q5_0, Q6_K, Q8_0: the Gemma 3 270M Q4_K_M file; Q4_1, Q8_0: SmolLM2's Q4_1 file;
- Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: SmolLM2 weights quantized by `gguf.quants.quantize`;
- Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: SmolLM2 weights quantized by llama.cpp itself (llama-cpp-python's
  llama_model_quantize; the gguf package cannot write K-quants);
and on random bytes (every bit pattern of scales and codes, not only what a quantizer emits)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from lmlab.model.config import ModelConfig
from lmlab.paths import smollm2_gguf
from lmlab.weights.build import build_model
from lmlab.weights.gguf_export import save_gguf
from lmlab.weights.gguf_quants import FORMATS, dequantize, unpack
from lmlab.gguf_file import GGUFFile
from lmlab.weights.loading import load_model

TYPES = sorted(FORMATS)


def _reference(raw: np.ndarray, kind: str) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]))


def _assert_same(raw: np.ndarray, kind: str) -> None:
    ours = dequantize(torch.from_numpy(np.ascontiguousarray(raw)), kind)
    assert torch.equal(ours, _reference(raw, kind)), kind


def _blocks_of(path, kinds: set[str], rows: int = 64) -> dict[str, np.ndarray]:
    """The first `rows` rows of the first tensor of each type in a file."""
    found: dict[str, np.ndarray] = {}
    for t in GGUFFile(path).tensors:
        if t.tensor_type.name in kinds and t.tensor_type.name not in found:
            found[t.tensor_type.name] = np.array(t.data[:rows])
    return found


def _random_blocks(kind: str, n_blocks: int, seed: int) -> np.ndarray:
    """Random bytes, the fp16 scale fields kept finite (so NaN != NaN cannot hide a mismatch)."""
    block, size, _ = FORMATS[kind]
    raw = np.random.default_rng(seed).integers(0, 256, (n_blocks, size), dtype=np.uint8)
    scales = {"Q2_K": (80, 82), "Q3_K": (108,), "Q6_K": (208,), "Q4_1": (0, 2), "Q5_1": (0, 2), "Q4_K": (0, 2),
              "Q5_K": (0, 2)}.get(kind, (0,))
    for at in scales:
        raw[:, at + 1] &= 0xBF  # clear the exponent's top bit: |scale| < 2
    return raw


@pytest.mark.parametrize("kind", TYPES)
def test_random_blocks(kind: str) -> None:
    raw = _random_blocks(kind, 256, 0).reshape(64, -1)  # 64 rows of 4 blocks
    _assert_same(raw, kind)
    assert dequantize(torch.from_numpy(raw), kind).shape == (64, 4 * FORMATS[kind][0])


def test_gemma3_q4_k_m_blocks(gemma3_gguf) -> None:
    blocks = _blocks_of(gemma3_gguf, {"Q4_K", "Q5_0", "Q6_K", "Q8_0"})
    assert sorted(blocks) == ["Q4_K", "Q5_0", "Q6_K", "Q8_0"]
    for kind, raw in blocks.items():
        _assert_same(raw, kind)


def test_smollm2_q4_1_blocks() -> None:
    blocks = _blocks_of(smollm2_gguf(), {"Q4_1", "Q8_0"})
    assert sorted(blocks) == ["Q4_1", "Q8_0"]
    for kind, raw in blocks.items():
        _assert_same(raw, kind)


@pytest.fixture(scope="module")
def smollm2() -> torch.nn.Module:
    return load_model("smollm2-135m-instruct").model


@pytest.fixture(scope="module")
def smollm2_ffn(smollm2) -> np.ndarray:
    """Real weights: SmolLM2's layer-3 down projection (576 x 1536), dequantized from its Q4_1 file."""
    return smollm2.layers[3].feed_forward.w2.weight.detach().numpy()


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_blocks_quantized_by_gguf(kind: str, smollm2_ffn) -> None:
    raw = gguf.quants.quantize(smollm2_ffn[:64], gguf.GGMLQuantizationType[kind])
    _assert_same(raw, kind)
    err = (dequantize(torch.from_numpy(raw), kind) - torch.from_numpy(smollm2_ffn[:64])).abs().max()
    assert err < 0.1 * np.abs(smollm2_ffn[:64]).max()  # and the blocks do encode these weights


@pytest.fixture(scope="module")
def llama_cpp_k_quants(tmp_path_factory, smollm2) -> dict[str, np.ndarray]:
    """K-quant blocks written by llama.cpp's quantizer (`pure`: every matrix of the chosen type) from a
    2-layer, 256-token slice of SmolLM2 (real weights; only its 1536-wide ffn_down rows fit 256-blocks)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python writes the K-quant test blocks")
    full = smollm2
    c = ModelConfig.from_dict({**full.config.to_dict(), "n_layers": 2, "vocab_size": 256})
    state = {k: v for k, v in full.state_dict().items() if not (k.startswith("layers.") and int(k.split(".")[1]) >= 2)}
    state["tok_embeddings.weight"] = state["tok_embeddings.weight"][:256]
    folder = tmp_path_factory.mktemp("kquants")
    save_gguf(build_model(c, state, "slice"), folder / "f32.gguf", None, "f32")
    blocks = {}
    for kind, ftype in (("Q2_K", "Q2_K"), ("Q3_K", "Q3_K_S"), ("Q4_K", "Q4_K_S"), ("Q5_K", "Q5_K_S"), ("Q6_K", "Q6_K")):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.pure, params.nthread = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}"), True, 2
        out = folder / f"{kind}.gguf"
        assert llama_cpp.llama_model_quantize(str(folder / "f32.gguf").encode(), str(out).encode(), params) == 0
        blocks.update(_blocks_of(out, {kind}, rows=576))
    return blocks


@pytest.mark.parametrize("kind", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_blocks_quantized_by_llama_cpp(kind: str, llama_cpp_k_quants) -> None:
    raw = llama_cpp_k_quants[kind]
    assert raw.shape == (576, 1536 // 256 * FORMATS[kind][1])
    _assert_same(raw, kind)


def test_unpack_is_the_affine_form() -> None:
    """q * scale + offset per group, groups of 32 (legacy, Q4_K, Q5_K) or 16 (Q2_K, Q3_K, Q6_K)."""
    for kind, (block, size, _) in FORMATS.items():
        raw = torch.from_numpy(_random_blocks(kind, 3, 1))
        q, scale, offset = unpack(raw, kind)
        group = 16 if kind in ("Q2_K", "Q3_K", "Q6_K") else 32
        assert q.shape == (3 * block // group, group) and scale.shape == (q.shape[0], 1)
        assert (offset is None) == (kind in ("Q4_0", "Q5_0", "Q8_0", "Q3_K", "Q6_K"))  # symmetric: signed codes
        w = q.float() * scale + (0 if offset is None else offset)
        assert torch.equal(w.reshape(3, block), dequantize(raw, kind)), kind
    with pytest.raises(ValueError, match="whole blocks of 18 bytes"):
        unpack(torch.zeros(19, dtype=torch.uint8), "Q4_0")
