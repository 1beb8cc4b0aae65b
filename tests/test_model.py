"""Invariants of the native decoder: shapes, causality, KV-cache parity, padding, GQA, MoE, sinks."""

from __future__ import annotations

import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.model.config import PRESETS, ModelConfig, get_preset
from lmlab.model.kv_cache import KVCache
from lmlab.model.rope import apply_rotary_emb, rope_angles, rope_inv_freq
from lmlab.model.transformer import Transformer

TINY = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, max_seq_len=48)
VARIANTS = {
    "llama-mha": dict(TINY),
    "llama-gqa": dict(TINY, n_kv_heads=2),
    "llama-mqa": dict(TINY, n_kv_heads=1),
    "gpt2": dict(TINY, norm="layernorm", pos="learned", mlp="gelu", gelu_approximate="tanh",
                 qkv_bias=True, out_bias=True, mlp_bias=True),
    "untied-nopos": dict(TINY, pos="none", tie_embeddings=False),
    "moe": dict(TINY, n_experts=4, n_experts_per_tok=2),
    "sinks": dict(TINY, sink_tokens=2, window=12),
    "rope-ntk": dict(TINY, rope_scaling="ntk", rope_scaling_factor=2.0),
}


def tiny(name: str) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**VARIANTS[name])).eval()


def test_presets_build_and_derive_shapes() -> None:
    assert get_preset("llama2c-stories15m").hidden_dim == 768  # llama2.c rule: 2/3 * 4 * 288, to 32
    assert get_preset("llama2c-stories42m").hidden_dim == 1376
    assert get_preset("smollm2-135m").head_dim == 64
    cfg = get_preset("minigpt-baseline")
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.dim, cfg.n_heads, cfg.n_layers, cfg.hidden_dim) == (50257, 64, 128, 4, 2, 512)
    assert cfg.norm == "layernorm" and cfg.pos == "learned" and cfg.mlp == "gelu"
    modern = get_preset("modern-decoder")
    assert modern.norm == "rmsnorm" and modern.mlp == "swiglu" and modern.pos == "rope" and modern.sink_tokens > 0
    n = Transformer(get_preset("gpt2-124m")).num_params()
    assert n == 124_439_808  # GPT-2 small, tied head
    assert set(PRESETS) >= {"llama2c-stories260k", "llama2c-stories15m", "llama2c-stories42m", "smollm2-135m", "gpt2-124m"}


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="n_kv_heads"):
        ModelConfig(**dict(TINY, n_kv_heads=3))
    with pytest.raises(ConfigError, match="norm"):
        ModelConfig(**dict(TINY, norm="batchnorm"))
    with pytest.raises(ConfigError, match="bogus"):
        ModelConfig.from_dict(dict(TINY, bogus=1))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_causal_and_cache_parity(name: str) -> None:
    """(With sinks the streaming cache evicts past sinks + window: see the streaming tests below.)"""
    model = tiny(name)
    x = torch.randint(0, 97, (2, 20))
    full = model(x)
    assert full.shape == (2, 20, 97)
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 1) % 97  # changing the future must not change the past
    torch.testing.assert_close(model(x2)[:, :10], full[:, :10], atol=1e-6, rtol=0)
    if name == "sinks":
        return
    cache = KVCache(model.config, 2, 40)
    steps = [model(x[:, :7], cache=cache)] + [model(x[:, t : t + 1], cache=cache) for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2", "sinks"])
def test_left_padding_equals_unpadded(name: str) -> None:
    model = tiny(name)
    x = torch.randint(1, 97, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :6] = 0
    x[1, :6] = 0
    out = model(x, attention_mask=mask)
    alone = model(x[1:, 6:])
    torch.testing.assert_close(out[1, 6:], alone[0], atol=1e-5, rtol=0)
    cache = KVCache(model.config, 2, 30)
    parts = [model(x[:, :9], attention_mask=mask[:, :9], cache=cache)]
    parts += [model(x[:, t : t + 1], cache=cache) for t in range(9, 16)]
    torch.testing.assert_close(torch.cat(parts, 1)[1, 6:], alone[0], atol=1e-5, rtol=0)


def test_gqa_equals_mha_with_repeated_kv_heads() -> None:
    gqa = tiny("llama-gqa")
    mha = Transformer(ModelConfig(**TINY)).eval()
    state = gqa.state_dict()
    for key in list(state):
        if key.endswith(("wk.weight", "wv.weight")):  # (Hkv*D, dim) -> (H*D, dim), each kv head twice
            w = state[key].view(2, 8, 32)
            state[key] = w.repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    x = torch.randint(0, 97, (1, 12))
    torch.testing.assert_close(mha(x), gqa(x), atol=1e-5, rtol=0)


def test_rope_rotates_pairs_and_keeps_norm() -> None:
    inv = rope_inv_freq(8, 10000.0)
    cos, sin = rope_angles(torch.arange(5)[None], inv)
    x = torch.randn(1, 5, 2, 8)
    y = apply_rotary_emb(x, cos.unsqueeze(-2), sin.unsqueeze(-2))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[:, 0], x[:, 0])  # position 0 is the identity
    # pair 0 at position 1 rotates by exactly 1 radian (theta^0)
    a, b = x[0, 1, 0, 0], x[0, 1, 0, 1]
    c, s = torch.cos(torch.tensor(1.0)), torch.sin(torch.tensor(1.0))
    torch.testing.assert_close(y[0, 1, 0, :2], torch.stack([a * c - b * s, a * s + b * c]))
    # relative property: <rot(q, m), rot(k, n)> depends on m - n only
    q, k = torch.randn(8), torch.randn(8)

    def rot(v: torch.Tensor, p: int) -> torch.Tensor:
        cc, ss = rope_angles(torch.tensor([[p]]), inv)
        return apply_rotary_emb(v.view(1, 1, 1, 8), cc.unsqueeze(-2), ss.unsqueeze(-2)).flatten()

    torch.testing.assert_close(rot(q, 7) @ rot(k, 3), rot(q, 14) @ rot(k, 10), atol=1e-4, rtol=0)


def test_moe_aux_loss_and_gradients() -> None:
    model = tiny("moe").train()
    logits = model(torch.randint(0, 97, (2, 10)))
    aux = model.aux_loss
    assert aux is not None and aux.item() > 0
    (logits.sum() + aux).backward()
    router = model.layers[0].feed_forward.router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0
    assert tiny("llama-mha").aux_loss is None


def test_sinks_keep_first_tokens_visible_and_run_past_context() -> None:
    cfg = ModelConfig(**dict(VARIANTS["sinks"], n_layers=1))  # one layer: no indirect paths
    model = Transformer(cfg).eval()
    x = torch.randint(0, 97, (1, 30))
    out = model(x)
    # token 25 sees the 2 sinks and the last 12 positions only: changing token 5 changes nothing there
    x2 = x.clone()
    x2[0, 5] = (x2[0, 5] + 1) % 97
    torch.testing.assert_close(model(x2)[0, 25], out[0, 25], atol=1e-6, rtol=0)
    x3 = x.clone()
    x3[0, 0] = (x3[0, 0] + 1) % 97  # a sink: visible everywhere
    assert (model(x3)[0, 25] - out[0, 25]).abs().max() > 1e-4
    # streaming cache: capacity sinks + window, decoding well past max_seq_len without error
    cache = KVCache(cfg, 1, 10_000)
    assert cache.capacity == cfg.sink_tokens + cfg.window
    model(x[:, :8], cache=cache)
    for _ in range(3 * cfg.max_seq_len):
        logits = model(torch.randint(0, 97, (1, 1)), cache=cache)
    assert torch.isfinite(logits).all() and cache.length == cache.capacity


def test_streaming_cache_equals_full_forward_inside_window() -> None:
    model = tiny("sinks")
    x = torch.randint(0, 97, (1, 14))  # sinks + window = 14: no eviction yet
    cache = KVCache(model.config, 1, 100)
    steps = [model(x[:, :5], cache=cache)] + [model(x[:, t : t + 1], cache=cache) for t in range(5, 14)]
    torch.testing.assert_close(torch.cat(steps, 1), model(x), atol=1e-5, rtol=0)


def test_learned_positions_past_table_is_an_error() -> None:
    model = tiny("gpt2")
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.randint(0, 97, (1, 49)))


def test_hidden_states_and_bf16() -> None:
    model = tiny("llama-gqa")
    x = torch.randint(0, 97, (1, 6))
    hidden = model(x, return_hidden=True)
    assert hidden.shape == (1, 6, 32)
    torch.testing.assert_close(model.output(hidden), model(x))
    out16 = model.to(torch.bfloat16)(x)
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16.float()).all()


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2", "sinks"])
@pytest.mark.parametrize("T", [40, 300])  # 300: the causal path splits the queries into uneven blocks
def test_math_attention_equals_sdpa(name: str, T: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU takes three plain kernels for small score matrices (see use_math_attention): logits and
    gradients must equal PyTorch's fused SDPA, with and without padding."""
    import lmlab.model.attention as model_mod

    cfg = dict(VARIANTS[name], max_seq_len=T)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**cfg)).eval()
    x = torch.randint(0, 97, (2, T))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :5] = 0

    def run(limit: int) -> list[torch.Tensor]:
        monkeypatch.setattr(model_mod, "MATH_ATTENTION_MAX_SCORES", limit)
        model.zero_grad()
        out = [model(x), model(x, attention_mask=mask)[1, 5:]]
        (out[0].square().mean() + out[1].square().mean()).backward()
        return out + [p.grad.clone() for p in model.parameters() if p.grad is not None]

    math_path, sdpa = run(1 << 30), run(0)
    for a, b in zip(math_path, sdpa, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
