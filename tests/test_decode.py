"""The few-call decode step (lmlab/model/decode.py) against Transformer.forward, step by step: float,
biased, int8, int4 and unfused models, grouped-query heads, left-padded batches; and where it must not run."""

from __future__ import annotations

import pytest
import torch

import lmlab.generation.generate as generation
from lmlab.generation.generate import GenerationConfig, generate_ids
from lmlab.generation.sampling import SamplingConfig
from lmlab.model.config import ModelConfig
from lmlab.model.decode import FastDecoder, fast_decode_supported
from lmlab.model.kv_cache import KVCache
from lmlab.model.quantize import fuse_projections, int4_supported, quantize_int4, quantize_int8
from lmlab.model.transformer import Transformer


def tiny(quant: str = "none", **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                                max_seq_len=64), **kw})
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
        model.output.weight.mul_(10)  # sharp logits: greedy choices are not near-ties
    if quant != "unfused":
        fuse_projections(model)
    if quant == "int8":
        quantize_int8(model, torch.bfloat16)
    elif quant == "int4":
        quantize_int4(model, torch.bfloat16)
    elif quant == "bf16":
        model.bfloat16()
    return model


CASES = [("none", {}), ("none", dict(qkv_bias=True, out_bias=True, mlp_bias=True)), ("bf16", {}),
         ("int8", {}), ("int4", {}), ("none", dict(n_kv_heads=1, rope_scaling="linear", rope_scaling_factor=2.0)),
         ("unfused", {})]


@pytest.mark.parametrize(("quant", "kw"), CASES)
def test_fast_step_equals_the_forward(quant: str, kw: dict) -> None:
    if quant == "int4" and not int4_supported(128, 64):
        pytest.skip("torch's int4 packing on this CPU is not one lmlab knows")
    model = tiny(quant, **kw)
    prompts = torch.randint(0, 96, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, :3] = False  # a left-padded row
    caches = [KVCache(model.config, 3, 20) for _ in range(2)]
    assert fast_decode_supported(model, caches[1])
    fast = FastDecoder(model, 3)
    with torch.inference_mode():
        for cache in caches:
            model(prompts, mask, cache=cache)
        for step in range(6):
            ids = torch.randint(0, 96, (3,), generator=torch.Generator().manual_seed(10 + step))
            want = model(ids[:, None], cache=caches[0], last_only=True)[:, -1]
            got = fast.step(ids, caches[1])
            tol = 1e-5 if quant in ("none", "unfused") else 2e-2  # bf16: the same ops, but kernels round differently
            torch.testing.assert_close(got.float(), want.float(), atol=tol * want.abs().max().item(), rtol=0)
            torch.testing.assert_close(caches[1].k, caches[0].k, atol=tol * 10, rtol=tol)


def test_generation_gives_the_same_tokens_with_and_without_it(monkeypatch) -> None:
    model = tiny("int8")
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]
    cfg = GenerationConfig(12, SamplingConfig(temperature=0))
    fast = generate_ids(model, prompts, cfg)
    monkeypatch.setattr(generation, "fast_decode_supported", lambda *_: False)
    assert generate_ids(model, prompts, cfg) == fast


def test_where_it_does_not_run() -> None:
    cache = lambda m: KVCache(m.config, 1, 8)  # noqa: E731
    assert not fast_decode_supported(tiny(window=4), cache(tiny(window=4)))
    sinks = tiny(sink_tokens=2)
    assert not fast_decode_supported(sinks, cache(sinks))
    layer_norm = tiny(norm="layernorm", mlp="gelu")
    assert not fast_decode_supported(layer_norm, cache(layer_norm))
    training = tiny().train()
    assert not fast_decode_supported(training, cache(training))


def test_cache_advance_is_begin_for_one_token() -> None:
    model = tiny()
    a, b = KVCache(model.config, 2, 6), KVCache(model.config, 2, 6)
    mask = torch.tensor([[False, True, True], [True, True, True]])
    for cache in (a, b):
        cache.begin(mask)
    for _ in range(3):
        start, pos = a.begin(torch.ones(2, 1, dtype=torch.bool))
        start_b, pos_b = b.advance()
        assert start_b == start and torch.equal(pos_b, pos[:, 0])
    for key in ("key_mask", "slot_pos", "next_pos"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert a.length == b.length == 6
    with pytest.raises(ValueError, match="KV cache full"):
        b.advance()


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_fast_step_on_a_servers_first_rows_with_holes(quant: str) -> None:
    """lmlab serve's cache: live sequences in the first rows of a larger cache, rejected drafts left as masked
    holes (KVCache.discard). The fast step over the first B rows computes what the forward computes."""
    model = tiny(quant)
    prompts = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(3))
    caches = [KVCache(model.config, 4, 24) for _ in range(2)]  # 4 rows, 2 live
    fast = FastDecoder(model, 2)
    tol = 1e-5 if quant == "none" else 2e-2
    with torch.inference_mode():
        for cache in caches:
            model(prompts, cache=cache)
            model(torch.randint(0, 96, (2, 3), generator=torch.Generator().manual_seed(4)), cache=cache)  # a verify
            cache.discard(torch.tensor([1, 2]), 3)  # row 0 keeps 1 of the 3, row 1 keeps 2: holes
        assert caches[1].has_padding and not bool(caches[1].key_mask[0, caches[1].length - 1])
        for step in range(4):
            ids = torch.randint(0, 96, (2,), generator=torch.Generator().manual_seed(20 + step))
            want = model(ids[:, None], cache=caches[0], last_only=True)[:, -1]
            got = fast.step(ids, caches[1])
            torch.testing.assert_close(got.float(), want.float(), atol=tol * want.abs().max().item(), rtol=0)
        for key in ("key_mask", "slot_pos", "next_pos"):
            assert torch.equal(getattr(caches[1], key)[:2], getattr(caches[0], key)[:2]), key


@pytest.mark.parametrize(("quant", "kw"), [("none", {}), ("int8", {}), ("none", dict(qkv_bias=True, n_kv_heads=1))])
def test_fast_forward_of_several_tokens_equals_the_forward(quant: str, kw: dict) -> None:
    """Speculative decoding's verify forward: T tokens per row, a row right-padded (fewer drafts), the
    rejected ones discarded into holes, then more verifies and single steps; logits and cache as the forward's."""
    model = tiny(quant, **kw)
    g = torch.Generator().manual_seed(5)
    prompts = torch.randint(0, 96, (3, 6), generator=g)
    left = torch.ones(3, 6, dtype=torch.bool)
    left[2, :2] = False
    caches = [KVCache(model.config, 4, 40) for _ in range(2)]  # a spare row, as a server's cache
    fast = FastDecoder(model, 3 * 4)
    tol = 1e-5 if quant == "none" else 2e-2
    with torch.inference_mode():
        for cache in caches:
            model(prompts, left, cache=cache)
        for round_ in range(3):
            ids = torch.randint(0, 96, (3, 4), generator=g)
            mask = torch.ones(3, 4, dtype=torch.bool)
            mask[1, 2:] = False  # row 1 has two drafts fewer
            want = model(ids, mask, cache=caches[0])
            got = fast.forward_tokens(ids, mask, caches[1])
            real = mask[..., None].expand_as(want)  # padded positions' logits are never read
            torch.testing.assert_close(got.float()[real], want.float()[real], atol=tol * want.abs().max().item(), rtol=0)
            keep = torch.tensor([1 + round_, 2, 4])
            for cache in caches:
                cache.discard(keep, 4)
            step = torch.randint(0, 96, (3,), generator=g)
            want = model(step[:, None], cache=caches[0], last_only=True)[:, -1]
            torch.testing.assert_close(fast.step(step, caches[1]).float(), want.float(),
                                       atol=tol * want.abs().max().item(), rtol=0)
        for key in ("key_mask", "slot_pos", "next_pos"):
            assert torch.equal(getattr(caches[1], key)[:3], getattr(caches[0], key)[:3]), key
        assert caches[1].length == caches[0].length
