"""GGUF loading: the real SmolLM2-135M-Instruct Q4_1 file against transformers reading the same file,
tiny GGUFs written here in llama.cpp's conventions (llama: q/k pre-permuted; qwen2: not) against the
transformers models they were made from, every quantization type `gguf` can write, and bad files."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from lmlab.errors import CheckpointError
from lmlab.model.config import get_preset
from lmlab.paths import smollm2_gguf
from lmlab.weights.gguf import load_gguf
from lmlab.weights.loading import load_model

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a little robot"]


# ---- the real file

@pytest.fixture(scope="module")
def smollm() -> object:
    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def hf_smollm() -> torch.nn.Module:
    """transformers' own GGUF reader and Llama model on the same file (~17 s: load once)."""
    transformers = pytest.importorskip("transformers")
    p = smollm2_gguf()
    return transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()


def test_smollm2_config_and_tokenizer(smollm) -> None:
    c = smollm.model.config
    expected = get_preset("smollm2-135m")
    for key in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim",
                "max_seq_len", "rope_theta", "norm", "mlp", "pos", "tie_embeddings", "qkv_bias"):
        assert getattr(c, key) == getattr(expected, key), key
    assert c.norm_eps == pytest.approx(1e-5)
    assert smollm.kind == "gguf" and smollm.source.endswith(".gguf")
    assert smollm.model.output.weight is smollm.model.tok_embeddings.weight
    assert smollm.model.num_params() == 134_515_008  # every element the file stores
    tok = smollm.tokenizer
    assert tok.vocab_size == 49152 and tok.eos_id == 2 and tok.chat_template


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm, hf_smollm) -> None:
    for prompt in PROMPTS:
        x = torch.tensor([smollm.tokenizer.encode(prompt)])
        with torch.no_grad():
            ours, ref = smollm.model(x), hf_smollm(x).logits
        torch.testing.assert_close(ours, ref, atol=2e-3, rtol=0)


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smollm, hf_smollm) -> None:
    from lmlab.generation.generate import GenerationConfig, generate_ids
    from lmlab.generation.sampling import SamplingConfig

    n = 32
    prompts = [smollm.tokenizer.encode(p) for p in PROMPTS]
    cfg = GenerationConfig(max_new_tokens=n, sampling=SamplingConfig(temperature=0.0))
    ours = generate_ids(smollm.model, prompts, cfg)
    for prompt, got in zip(prompts, ours):
        ref = hf_smollm.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert got == ref, smollm.tokenizer.decode(prompt)


def test_smollm2_bf16_load(smollm) -> None:
    """Dequantized straight into bf16: same weights up to bf16 rounding."""
    config, state, _ = load_gguf(smollm2_gguf(), dtype=torch.bfloat16, with_tokenizer=False)
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    ref = smollm.model.layers[3].attention.wq.weight
    torch.testing.assert_close(state["layers.3.attention.wq.weight"].float(), ref, atol=0, rtol=1e-2)


# ---- tiny files in llama.cpp's conventions

def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: HF rotate-half rows -> interleaved."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, hf_model, arch: str, qtype=gguf.GGMLQuantizationType.F32) -> None:
    """What convert_hf_to_gguf.py writes for a Llama/Qwen2 model (metadata + renamed tensors)."""
    c = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, p in hf_model.state_dict().items():
        a = p.detach().numpy().astype(np.float32)
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if arch == "llama" and ".q_proj." in name:
            a = _permute(a, c.num_attention_heads)
        if arch == "llama" and ".k_proj." in name:
            a = _permute(a, c.num_key_value_heads)
        parts = name.split(".")
        if parts[0] == "model" and parts[1] == "layers":
            base = ".".join(parts[3:-1])
            gname = f"blk.{parts[2]}.{names[base]}.{parts[-1]}"
        else:
            gname = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}[
                ".".join(parts[:-1])] + "." + parts[-1]
        if a.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny_hf(arch: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, tie_word_embeddings=False))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_matches_source_model(arch: str, tmp_path) -> None:
    hf = _tiny_hf(arch)
    _write_gguf(tmp_path / "tiny.gguf", hf, arch)
    loaded = load_model(tmp_path / "tiny.gguf")
    assert loaded.tokenizer is None  # no tokenizer.ggml.* metadata in this file
    assert loaded.model.config.qkv_bias == (arch == "qwen2")
    assert loaded.model.config.tie_embeddings == (arch == "qwen2")
    x = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), hf(x).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_quantized_tensors_dequantize_like_gguf(qtype: str, tmp_path) -> None:
    hf = _tiny_hf("llama")
    q = gguf.GGMLQuantizationType[qtype]
    _write_gguf(tmp_path / "q.gguf", hf, "llama", q)
    reader = gguf.GGUFReader(tmp_path / "q.gguf")
    expected = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    _, state, _ = load_gguf(tmp_path / "q.gguf", with_tokenizer=False)
    assert state["layers.1.feed_forward.w3.weight"].numpy().tobytes() == expected["blk.1.ffn_up.weight"].tobytes()
    # and the quantized model still computes nearly the same function
    x = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        err = (load_model(tmp_path / "q.gguf").model(x) - hf(x).logits).abs().max().item()
    assert err < {"F16": 1e-2, "BF16": 5e-2, "Q8_0": 5e-2}.get(qtype, 0.5)


# ---- bad input

def test_unsupported_architecture(tmp_path) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"phi\.gguf: GGUF architecture 'phi2' is not supported; supported: \['llama', 'qwen2', 'gemma3'\]"):
        load_model(tmp_path / "phi.gguf")


def test_unsupported_tensor_type(tmp_path) -> None:
    hf = _tiny_hf("llama")
    _write_gguf(tmp_path / "ok.gguf", hf, "llama")
    reader = gguf.GGUFReader(tmp_path / "ok.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "int.gguf"), "llama")
    for key, f in reader.fields.items():
        if key.startswith("llama."):
            w.add_key_value(key, f.contents(), f.types[0])
    for t in reader.tensors:
        data = np.array(t.data)
        w.add_tensor(t.name, data.astype(np.int32) if t.name == "blk.0.ffn_up.weight" else data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"int\.gguf: tensor blk\.0\.ffn_up\.weight has quantization I32.*supported: \["):
        load_model(tmp_path / "int.gguf")


def test_truncated_and_missing_gguf(tmp_path) -> None:
    data = smollm2_gguf().read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:300_000])  # inside the tokenizer metadata
    with pytest.raises(CheckpointError, match=r"cut\.gguf: .*truncated"):
        load_model(tmp_path / "cut.gguf")
    (tmp_path / "cut2.gguf").write_bytes(data[: len(data) // 2])  # inside the tensor data
    with pytest.raises(CheckpointError, match=r"cut2\.gguf: .*truncated"):
        load_model(tmp_path / "cut2.gguf")
    with pytest.raises(CheckpointError, match=r"nope\.gguf: no such file"):
        load_model(tmp_path / "nope.gguf")
