"""Parity with transformers: tiny random GPT-2 / Llama (GQA) / Mistral (sliding window) / Qwen2 (q/k/v
biases) built in the test, saved as Hugging Face folders, loaded into lmlab (logits within 1e-4), and
lmlab models exported with save_hf and loaded back by transformers (same logits)."""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.errors import CheckpointError, ConfigError
from lmlab.model.config import ModelConfig, get_preset
from lmlab.model.transformer import Transformer
from lmlab.weights.build import to_interleaved, to_rotate_half
from lmlab.weights.hf import hf_family, save_hf
from lmlab.weights.loading import load_model

transformers = pytest.importorskip("transformers")
V, T = 97, 12


def _hf_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, rms_norm_eps=1e-5)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(cfg)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(**common, num_key_value_heads=2, rope_theta=5000.0, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**common, num_key_value_heads=1, sliding_window=5, head_dim=24)
        model = transformers.MistralForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # random biases and norm gains, so a wrong mapping cannot hide behind zeros/ones
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _tokens() -> torch.Tensor:
    return torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral", "qwen2"])
def test_hf_folder_loads_with_same_logits(kind: str, tmp_path) -> None:
    hf = _hf_model(kind)
    hf.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.kind == "hf"
    x = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), hf(x).logits, atol=1e-4, rtol=0)
    if kind == "mistral":
        assert loaded.model.config.window == 5  # T > window: the sliding window is exercised
    if kind == "qwen2":
        assert loaded.model.config.qkv_bias and not loaded.model.config.out_bias


@pytest.mark.parametrize("preset,overrides", [
    ("gpt2-124m", {}),
    ("minigpt-baseline", {"dropout": 0.0}),  # exact GELU, untied head
    ("llama2c-stories260k", {"n_kv_heads": 2, "rope_scaling": "linear", "rope_scaling_factor": 2.0}),
    ("llama2c-stories260k", {"qkv_bias": True, "tie_embeddings": False}),  # -> Qwen2
    ("llama2c-stories260k", {"window": 4}),  # -> Mistral
    ("llama2c-stories260k", {"qkv_bias": True, "out_bias": True, "mlp_bias": True}),  # Llama attention_bias
])
def test_save_hf_round_trip(preset: str, overrides: dict, tmp_path) -> None:
    small = dict(vocab_size=V, dim=64, n_layers=2, n_heads=4, max_seq_len=32, **overrides)
    if "n_kv_heads" not in overrides and preset.startswith("llama2c"):
        small["n_kv_heads"] = 4
    model = Transformer(get_preset(preset, **small)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    save_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"][0]
    x = _tokens()
    with torch.no_grad():
        ours = model(x)
        torch.testing.assert_close(hf(x).logits, ours, atol=1e-4, rtol=0)
        # and back into lmlab: the exact same weights
        back = load_model(str(tmp_path / "hf")).model
        torch.testing.assert_close(back(x), ours, atol=1e-5, rtol=0)


def test_permutations_are_inverse() -> None:
    w = torch.randn(4 * 8, 5)
    torch.testing.assert_close(to_rotate_half(to_interleaved(w, 4), 4), w)
    b = torch.arange(16.0)
    assert to_interleaved(b, 2).tolist()[:8] == [0, 4, 1, 5, 2, 6, 3, 7]  # pairs (x_i, x_{i+d/2})


@pytest.mark.parametrize("field,overrides", [
    ("sink_tokens", {"sink_tokens": 4}),
    ("n_experts", {"n_experts": 4}),
    ("rope_scaling", {"rope_scaling": "ntk", "rope_scaling_factor": 2.0}),
    ("pos", {"pos": "learned"}),
    ("out_bias", {"out_bias": True}),
])
def test_save_hf_rejects_configs_without_equivalent(field: str, overrides: dict) -> None:
    config = ModelConfig(vocab_size=V, dim=32, n_layers=1, n_heads=2, **overrides)
    with pytest.raises(ConfigError, match=f"model.{field}="):
        hf_family(config)


def test_hf_shape_mismatch_names_tensor(tmp_path) -> None:
    hf = _hf_model("llama")
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tensor layers\.0\.feed_forward\.w\d\.weight has shape .*config expects .*128"):
        load_model(str(tmp_path))


def test_hf_unsupported_settings_are_named(tmp_path) -> None:
    hf = _hf_model("llama")
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rope scaling type 'yarn'"):
        load_model(str(tmp_path))
    cfg["model_type"] = "phi3"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'phi3' is not supported"):
        load_model(str(tmp_path))


def test_truncated_safetensors(tmp_path) -> None:
    _hf_model("gpt2").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable or truncated"):
        load_model(str(tmp_path))


def test_pytorch_model_bin(tmp_path) -> None:
    """Older folders ship pytorch_model.bin: read with torch.load(weights_only=True)."""
    hf = _hf_model("llama")
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    x = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(tmp_path)).model(x), hf(x).logits, atol=1e-4, rtol=0)
