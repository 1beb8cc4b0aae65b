"""KVCache rows as slots (continuous batching, speculative decoding): every row must give the logits a
full, uncached forward over its own tokens gives, whatever joins, leaves, holes and moves happened."""

from __future__ import annotations

import random

import pytest
import torch

from lmlab.model.config import ModelConfig
from lmlab.model.kv_cache import KVCache
from lmlab.model.transformer import Transformer


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128), **kw})
    return Transformer(cfg).eval()


def reference(model: Transformer, tokens: list[int]) -> torch.Tensor:
    """Next-token logits after `tokens`, no cache."""
    return model(torch.tensor([tokens]))[0, -1]


def prefill(model: Transformer, prompts: list[list[int]]) -> tuple[KVCache, torch.Tensor]:
    longest = max(map(len, prompts))
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p):], mask[i, longest - len(p):] = torch.tensor(p), True
    cache = KVCache(model.config, len(prompts), longest)
    return cache, model(tokens, mask, cache=cache, last_only=True)[:, -1]


@torch.inference_mode()
def test_forward_over_the_first_rows_equals_a_cache_of_that_size() -> None:
    model = tiny()
    prompt = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    small = KVCache(model.config, 2, 16)
    big = KVCache(model.config, 5, 16)
    for step in range(3):
        a = model(prompt if step == 0 else prompt[:, -1:], cache=small, last_only=True)
        b = model(prompt if step == 0 else prompt[:, -1:], cache=big, last_only=True)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("window", [None, 6])
@torch.inference_mode()
def test_rows_join_leave_and_discard_like_separate_sequences(window) -> None:
    """A random schedule of joins (prefilled apart, attached), leaves (move_row), speculative feeds with
    rejected tokens (discard), compaction and a small storage (make_room copies): each live row's logits
    equal the uncached forward over that row's real tokens."""
    model = tiny(window=window)
    rng = random.Random(0)
    cache = KVCache(model.config, 4, 40)  # small storage: the views run out and get repacked
    rows: list[list[int]] = []  # each live row's real tokens, pending token last (not yet in the cache)
    checked = 0
    for step in range(60):
        if len(rows) < 4 and (not rows or rng.random() < 0.3):  # join
            new = [[rng.randrange(50) for _ in range(rng.choice([rng.randint(1, 9), rng.randint(10, 24)]))]
                   for _ in range(rng.randint(1, 4 - len(rows)))]
            tmp, logits = prefill(model, new)
            for j, p in enumerate(new):
                cache.attach(len(rows), tmp, j, len(rows))
                rows.append(p + [int(logits[j].argmax())])
        if rows and rng.random() < 0.15:  # leave: the last row takes the gap
            gone = rng.randrange(len(rows))
            if gone != len(rows) - 1:
                cache.move_row(len(rows) - 1, gone)
            rows[gone] = rows[-1]
            rows.pop()
        if not rows:
            continue
        B = len(rows)
        longest = max(len(r) for r in rows)
        if longest + 4 > 36:  # the test's "context": finish the longest row
            i = max(range(B), key=lambda r: len(rows[r]))
            if i != B - 1:
                cache.move_row(B - 1, i)
            rows[i] = rows[-1]
            rows.pop()
            continue
        if rng.random() < 0.2:
            cache.compact(B)
        T = rng.choice([1, 1, 3])  # one token, or a pending token plus two drafts
        feed = [[r[-1]] + [rng.randrange(50) for _ in range(T - 1)] for r in rows]
        cache.make_room(T, B)
        logits = model(torch.tensor(feed), cache=cache)  # (B, T, V)
        keep = torch.tensor([rng.randint(1, T) for _ in range(B)])
        cache.discard(keep, T)
        for b in range(B):
            kept = feed[b][: int(keep[b])]
            history = rows[b][:-1] + kept
            torch.testing.assert_close(logits[b, int(keep[b]) - 1], reference(model, history), rtol=0, atol=1e-5)
            checked += 1
            rows[b] = history + [int(logits[b, int(keep[b]) - 1].argmax())]
    assert checked > 80


@torch.inference_mode()
def test_discard_all_but_the_first_rewinds_a_single_row() -> None:
    model = tiny()
    cache = KVCache(model.config, 1, 32)
    model(torch.tensor([[1, 2, 3]]), cache=cache)
    model(torch.tensor([[4, 5, 6]]), cache=cache)
    cache.discard(torch.tensor([1]), 3)
    assert cache.length == 4 and not cache.has_padding and int(cache.next_pos[0]) == 4
    logits = model(torch.tensor([[7]]), cache=cache)[0, -1]
    torch.testing.assert_close(logits, reference(model, [1, 2, 3, 4, 7]), rtol=0, atol=1e-5)


def test_rows_as_slots_refuse_a_streaming_cache() -> None:
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4, max_seq_len=64, sink_tokens=2, window=8)
    cache = KVCache(cfg, 2, 16)
    with pytest.raises(ValueError, match="attention sinks"):
        cache.discard(torch.tensor([1, 1]), 1)


@torch.inference_mode()
def test_a_prompt_longer_than_the_fill_joins_an_emptied_cache() -> None:
    """The last row left after decoding a while; a prompt longer than the stale fill joins row 0."""
    model = tiny()
    cache = KVCache(model.config, 2, 64)
    tmp, _ = prefill(model, [[1, 2, 3]])
    cache.attach(0, tmp, 0, 0)
    for _ in range(5):
        cache.make_room(1, 1)
        model(torch.tensor([[4]]), cache=cache)
    long = list(range(1, 20))
    tmp, _ = prefill(model, [long])
    cache.attach(0, tmp, 0, 0)
    cache.make_room(1, 1)
    torch.testing.assert_close(model(torch.tensor([[7]]), cache=cache)[0, -1], reference(model, long + [7]),
                               rtol=0, atol=1e-5)
