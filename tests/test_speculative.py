"""Speculative decoding: the accept/reject rule keeps the target distribution, greedy output is
token-identical to plain greedy decoding (prompt lookup and a draft model, one row and a batch with holes),
and sampled output on a tiny real model follows the target distribution."""

from __future__ import annotations

import copy

import pytest
import torch
from scipy.stats import chisquare

from lmlab.errors import ConfigError
from lmlab.generation.generate import GenerationConfig, encode_prompt, generate, generate_ids
from lmlab.generation.sampling import SamplingConfig
from lmlab.generation.speculative import (
    DraftModel,
    PromptLookup,
    SpeculativeDecoder,
    accept_drafts,
    lookup_draft,
    speculative_generate_ids,
    token_probs,
)
from lmlab.weights.loading import load_model

GREEDY = SamplingConfig(temperature=0)


@pytest.fixture(scope="module")
def stories(shared_data):
    loaded = load_model(shared_data / "stories260K" / "stories260K.bin", dtype="fp32")
    return loaded.model, loaded.tokenizer


def perturbed(model, scale: float = 0.6, seed: int = 0):
    """The same model with noisy weights: a draft that agrees with the target only part of the time."""
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std() * scale)
    return draft


def test_lookup_draft_takes_what_followed_the_latest_longest_match() -> None:
    h = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert lookup_draft(h, 2) == [7, 8]  # latest earlier "1 2 3" is followed by 7 8
    assert lookup_draft([4, 5, 6, 5], 3) == [6, 5]  # 1-gram "5": what followed it, up to the end
    assert lookup_draft([1, 2, 3], 3) == []
    assert lookup_draft([7], 3) == []


def test_prompt_lookup_drafts_after_two_matching_tokens_by_default() -> None:
    """A 1-token match (mostly wrong drafts, each widening the verify forward) drafts nothing by default."""
    one, two = [4, 5, 6, 9, 5], [4, 5, 6, 9, 4, 5]
    lookup = PromptLookup()
    assert lookup.propose([one, two], [3, 3], [GREEDY] * 2, [None] * 2)[0] == [[], [6, 9, 4]]
    assert PromptLookup(min_ngram=1).propose([one], [3], [GREEDY], [None])[0] == [[6, 9, 5]]


@pytest.mark.parametrize("deterministic", [True, False])
def test_the_rule_keeps_the_target_distribution(deterministic: bool) -> None:
    """Whatever the draft distribution q, the token the rule emits is distributed as p (chi-square), and
    the same test tells the draft's own distribution apart."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05, 0.0])
    q = torch.tensor([0.05, 0.1, 0.05, 0.3, 0.2, 0.3])
    counts, drafted = torch.zeros(6), torch.zeros(6)
    N = 5000
    for _ in range(N):
        x = 3 if deterministic else int(torch.multinomial(q, 1, generator=g))
        n, token = accept_drafts(torch.stack([p, p]), [x], None if deterministic else q[None], g)
        counts[x if n == 1 else token] += 1
        drafted[x] += 1
    assert counts[5] == 0  # a token the target gives probability 0 is never emitted
    assert _chi2_pvalue(counts, p) > 1e-3
    if not deterministic:
        assert _chi2_pvalue(drafted, p) < 1e-6


@pytest.mark.parametrize("drafter", ["lookup", "draft-model"])
def test_greedy_speculative_equals_plain_greedy(stories, drafter: str) -> None:
    model, tok = stories
    prompts = [tok.encode(t, bos=True) for t in ["Once upon a time", "Lily and Ben went to the park. Lily", "The"]]
    cfg = GenerationConfig(max_new_tokens=60, sampling=GREEDY)
    plain = [generate_ids(model, [p], cfg)[0] for p in prompts]
    make = (lambda: PromptLookup(k=4, min_ngram=1)) if drafter == "lookup" else (lambda: DraftModel(perturbed(model, 0.1), k=3))
    for batch in ([p] for p in prompts):  # one row at a time: rejected drafts are rewound
        stats: dict = {}
        assert speculative_generate_ids(model, batch, cfg, make(), stats=stats) == [plain[prompts.index(batch[0])]]
        assert 0 < stats["accepted"] < stats["drafted"]  # both paths of the rule were taken
    assert speculative_generate_ids(model, prompts, cfg, make()) == plain  # a batch: holes per row


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_speculative_on_quantized_weights(shared_data, quantize: str) -> None:
    """The default GGUF path keeps weights quantized (its embedding table is an Int8Embedding, no `weight`):
    speculative decoding, with prompt lookup and with a quantized draft model, runs on it and gives plain
    greedy decoding's tokens (fp32 compute, so the 1-token and the verify forwards round alike)."""
    path = shared_data / "stories260K" / "stories260K.bin"
    model = load_model(path, dtype="fp32", quantize=quantize).model
    draft = load_model(path, dtype="fp32", quantize=quantize).model
    tok = load_model(path, dtype="fp32").tokenizer
    prompts = [tok.encode(t, bos=True) for t in ["Once upon a time", "Lily and Ben went to the park. Lily"]]
    cfg = GenerationConfig(max_new_tokens=40, sampling=GREEDY)
    plain = [generate_ids(model, [p], cfg)[0] for p in prompts]
    for make in (lambda: PromptLookup(k=4, min_ngram=1), lambda: DraftModel(draft, k=3)):
        stats: dict = {}
        assert [speculative_generate_ids(model, [p], cfg, make(), stats=stats)[0] for p in prompts] == plain
        assert stats["accepted"] > 0


def test_speculative_on_the_default_packed_gguf() -> None:
    """`lmlab generate --speculative` on the embedded default (Q4_1 kept packed, the tied embedding an
    Int8Embedding with no `weight`: this was an AttributeError): fp32 greedy output equals plain decoding."""
    loaded = load_model("smollm2-135m-instruct", quantize="auto", dtype="fp32")
    model, tok = loaded.model, loaded.tokenizer
    prompt = encode_prompt(tok, "Repeat exactly: the quick brown fox jumps over the lazy dog. the quick brown fox", chat=True)
    cfg = GenerationConfig(max_new_tokens=24, sampling=GREEDY, stop_ids=tuple(tok.stop_ids))
    stats: dict = {}
    plain = generate_ids(model, [prompt], cfg)[0]
    assert speculative_generate_ids(model, [prompt], cfg, PromptLookup(k=4), stats=stats)[0] == plain
    assert tok.decode(plain).startswith("The quick brown fox") and stats["accepted"] > 0


def test_greedy_speculative_text_and_stop_strings(stories) -> None:
    model, tok = stories
    cfg = GenerationConfig(max_new_tokens=80, sampling=GREEDY, stop_strings=("park",))
    prompts = ["Once upon a time", "Tom had a big red ball."]
    plain = generate(model, tok, prompts, cfg)
    decoder = SpeculativeDecoder(PromptLookup(k=5))
    assert generate(model, tok, prompts, cfg, decoder=decoder) == plain
    assert decoder.stats["steps"] > 0


def test_sampled_speculative_follows_the_target_distribution(stories) -> None:
    """4000 rows of one prompt, temperature 1, a noisy draft model: the second token's marginal and the
    third token's distribution after the commonest two-token start match the target model's exact ones
    (chi-square), although the draft's own distribution is far from them."""
    model, tok = stories
    prompt = tok.encode("Once upon a time, there was a little", bos=True)
    draft = perturbed(model, 0.2)
    N = 4000
    cfg = GenerationConfig(max_new_tokens=4, sampling=SamplingConfig(temperature=1.0), seed=0)
    stats: dict = {}
    out = speculative_generate_ids(model, [prompt] * N, cfg, DraftModel(draft, k=3), stats=stats)
    assert 0.2 < stats["accepted"] / stats["drafted"] < 0.9
    full = [o for o in out if len(o) >= 3]  # rows that hit no stop id
    assert len(full) > 0.95 * N
    with torch.no_grad():
        p1 = token_probs(model(torch.tensor([prompt]))[0, -1], cfg.sampling)
        V = p1.shape[0]
        nxt = torch.tensor([prompt + [t] for t in range(V)])
        p2_given = token_probs(model(nxt)[:, -1], cfg.sampling)  # (V, V)
        p2 = p1 @ p2_given
        q2 = p1 @ token_probs(draft(nxt)[:, -1], cfg.sampling)
    second = torch.bincount(torch.tensor([o[1] for o in full]), minlength=V).float()
    assert _chi2_pvalue(second, p2) > 1e-3
    assert _chi2_pvalue(second, q2) < 1e-6  # the test can tell the draft's distribution apart
    pairs: dict = {}
    for o in full:
        pairs.setdefault((o[0], o[1]), []).append(o[2])
    (t1, t2), thirds = max(pairs.items(), key=lambda kv: len(kv[1]))
    with torch.no_grad():
        p3 = token_probs(model(torch.tensor([prompt + [t1, t2]]))[0, -1], cfg.sampling)
    assert len(thirds) > 300
    assert _chi2_pvalue(torch.bincount(torch.tensor(thirds), minlength=V).float(), p3) > 1e-3


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit, bins with expected count < 5 pooled into one."""
    expected = probs.double() * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts.double()[big], counts.double()[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    exp = exp * obs.sum() / exp.sum()
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


def test_speculative_refuses_what_it_cannot_keep_exact(stories) -> None:
    model, _ = stories
    with pytest.raises(ConfigError, match="repetition penalty"):
        speculative_generate_ids(model, [[1, 2]], GenerationConfig(4, SamplingConfig(repetition_penalty=1.2)),
                                 PromptLookup())
    with pytest.raises(ConfigError, match="same vocabulary"):
        DraftModel(model, k=2, vocab_size=1000)
