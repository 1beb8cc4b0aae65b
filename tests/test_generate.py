"""Sampling transforms and the generation loop: properties, cache parity, batching, seeds, stops."""

from __future__ import annotations

import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.generation.generate import GenerationConfig, generate, generate_ids
from lmlab.generation.sampling import (
    SamplingConfig,
    epsilon_filter,
    min_p_filter,
    sample_next,
    top_k_filter,
    top_p_filter,
    transform_logits,
)
from lmlab.model.config import ModelConfig
from lmlab.model.transformer import Transformer
from lmlab.tokenization import CharTokenizer

GREEDY = SamplingConfig(temperature=0)


def tiny_model(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64), **kw})
    model = Transformer(cfg).eval()
    with torch.no_grad():  # sharper logits so greedy paths are not ties
        model.output.weight.mul_(20)
    return model


def test_filters_keep_the_right_sets() -> None:
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]])
    logits = probs.log()
    kept = lambda out: (out > float("-inf")).squeeze(0).tolist()  # noqa: E731
    assert kept(top_k_filter(logits, 2)) == [True, True, False, False, False]
    assert kept(top_p_filter(logits, 0.7)) == [True, True, False, False, False]  # 0.5 + 0.25 reaches 0.7
    assert kept(top_p_filter(logits, 0.5)) == [True, False, False, False, False]
    assert kept(min_p_filter(logits, 0.2)) == [True, True, True, False, False]  # >= 0.1
    assert kept(epsilon_filter(logits, 0.1)) == [True, True, True, False, False]
    # epsilon above every probability: the most likely token still survives
    assert kept(epsilon_filter(logits, 0.9)) == [True, False, False, False, False]


def test_sampling_distribution_and_seed() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, SamplingConfig(temperature=1.0), g)
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.015, rtol=0)
    draws_k = sample_next(logits, SamplingConfig(temperature=1.0, top_k=2), g)
    assert set(draws_k.tolist()) == {0, 1}
    hot = sample_next(logits, SamplingConfig(temperature=0.05), g)
    assert (hot == 0).float().mean() > 0.99  # low temperature ~ greedy
    a = sample_next(logits[:5], SamplingConfig(), torch.Generator().manual_seed(7))
    b = sample_next(logits[:5], SamplingConfig(), torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_repetition_penalty_lowers_seen_tokens() -> None:
    logits = torch.tensor([[2.0, -1.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    out = transform_logits(logits, SamplingConfig(temperature=0, repetition_penalty=2.0), seen)
    assert out.tolist() == [[1.0, -2.0, 1.0]]


def test_bad_sampling_values_are_errors() -> None:
    with pytest.raises(ConfigError, match="top_p"):
        SamplingConfig(top_p=1.5)
    with pytest.raises(ConfigError, match="temperature"):
        SamplingConfig(temperature=-1)


def _greedy_no_cache(model: Transformer, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_cached_greedy_equals_full_recomputation() -> None:
    model = tiny_model()
    prompt = [3, 7, 1, 9]
    out = generate_ids(model, [prompt], GenerationConfig(max_new_tokens=30, sampling=GREEDY))[0]
    assert out == _greedy_no_cache(model, prompt, 30)


def test_batched_equals_one_by_one() -> None:
    model = tiny_model()
    prompts = [[5], [1, 2, 3, 4, 5, 6, 7], [9, 9, 3]]
    cfg = GenerationConfig(max_new_tokens=20, sampling=GREEDY)
    batched = generate_ids(model, prompts, cfg)
    assert batched == [generate_ids(model, [p], cfg)[0] for p in prompts]


def test_text_batches_keep_prompt_order_and_greedy_outputs() -> None:
    tok = CharTokenizer.from_text("abcdefghij klmnop\n")
    model = tiny_model(vocab_size=tok.vocab_size)
    prompts = ["abcdefg", "a", "klm", "b", "hij kl", "ppp"]
    cfg = GenerationConfig(max_new_tokens=12, sampling=GREEDY, stop_strings=("k",))
    alone = [generate(model, tok, [p], cfg)[0] for p in prompts]
    assert generate(model, tok, prompts, cfg, batch_size=4) == alone  # sorted by length, returned in order
    assert generate(model, tok, prompts, cfg) == alone
    with pytest.raises(ValueError, match="batch_size"):
        generate(model, tok, prompts, cfg, batch_size=0)


def test_seed_reproduces_and_stop_ids_end_rows() -> None:
    model = tiny_model()
    cfg = GenerationConfig(max_new_tokens=25, sampling=SamplingConfig(temperature=1.0, top_p=0.95), seed=123)
    a = generate_ids(model, [[1, 2], [3]], cfg)
    assert a == generate_ids(model, [[1, 2], [3]], cfg)
    # stopping on the first greedy token of row 0 ends that row at once, the other row continues
    first = generate_ids(model, [[1, 2]], GenerationConfig(max_new_tokens=1, sampling=GREEDY))[0][0]
    out = generate_ids(model, [[1, 2], [3]], GenerationConfig(max_new_tokens=10, sampling=GREEDY, stop_ids=(first,)))
    assert out[0] == []
    assert first not in out[1] and len(out[1]) <= 10


def test_text_generation_stop_strings_and_streaming() -> None:
    tok = CharTokenizer.from_text("abcdefghij klmnop\n")
    model = tiny_model(vocab_size=tok.vocab_size)
    cfg = GenerationConfig(max_new_tokens=40, sampling=GREEDY)
    full = generate(model, tok, ["abc"], cfg)[0]
    assert len(full) == 40
    stop = full[5:7]
    pieces: list[str] = []
    cut = generate(model, tok, ["abc"], GenerationConfig(40, GREEDY, stop_strings=(stop,)),
                   stream=lambda row, text: pieces.append(text))[0]
    assert cut == full[: full.find(stop)]
    assert "".join(pieces).startswith(cut)


def test_sinks_generate_past_trained_context() -> None:
    model = tiny_model(max_seq_len=16, sink_tokens=2)
    out = generate_ids(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=60, sampling=GREEDY))[0]
    assert len(out) == 60  # 63 positions with a 16-token trained context
