"""Speculative decoding: cheap draft tokens, checked by the target model in one forward.

Each step feeds the pending token plus k draft tokens to the target at once; the longest prefix of drafts
the target accepts is kept, plus one token of its own, so a step yields 1 to k+1 tokens for the price of
about one forward when decoding is bound by reading the weights (Leviathan et al. 2023, "Fast Inference from
Transformers via Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model Decoding with
Speculative Sampling"). Two drafters:

- `PromptLookup`: the tokens that followed the latest earlier occurrence of the last n-gram of the prompt
  and the text so far (Saxena 2023, "prompt lookup decoding"; vLLM's ngram speculator). Free to run, and it
  pays off when the output copies the input (summaries, edits, extraction).
- `DraftModel`: any model with the same vocabulary proposes k tokens with its own KV cache.

One accept/reject rule, `accept_drafts`: draft x with draft probability q(x) is kept with probability
min(1, p(x) / q(x)); at the first rejection the token is drawn from norm(max(0, p - q)); if all are kept
one more is drawn from p. The output then follows the target distribution p exactly. p is the distribution
plain decoding samples from (`lmlab.generation.sampling` transforms: temperature, top-k/p, min-p, epsilon);
greedy decoding is p = one-hot(argmax), so greedy output is token-identical to plain greedy decoding.
Deterministic drafts (prompt lookup) have q = one-hot(x).

Rejected drafts are dropped from the KV cache with `KVCache.discard` (holes in a batch, a rewind for one
row). `speculative_generate_ids` is the decode loop for `lmlab generate --speculative`; the server's engine
(lmlab/serve/engine.py) runs the same drafters, verify and rule inside its continuous batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from lmlab.errors import ConfigError
from lmlab.generation.generate import GenerationConfig, _cache_dtype, left_pad
from lmlab.generation.sampling import SamplingConfig, transform_logits
from lmlab.model.decode import FastDecoder, fast_decode_supported
from lmlab.model.kv_cache import KVCache
from lmlab.model.quantize import linear_dtype
from lmlab.model.transformer import Transformer
from lmlab.weights.loading import load_model

Drafts = tuple[list[list[int]], "torch.Tensor | None"]  # draft ids per row; (B, k, V) draft probs, None = deterministic


def token_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The distribution plain decoding draws the next token from: (..., V) logits -> (..., V) probs."""
    logits = transform_logits(logits, cfg)
    if cfg.greedy:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return logits.softmax(-1)


def row_probs(logits: torch.Tensor, cfgs: Sequence[SamplingConfig]) -> torch.Tensor:
    """token_probs for rows (B, ..., V) that may each have their own sampling settings."""
    if all(c is cfgs[0] for c in cfgs):
        return token_probs(logits, cfgs[0])
    return torch.stack([token_probs(logits[i], c) for i, c in enumerate(cfgs)])


def accept_drafts(
    p: torch.Tensor, drafts: Sequence[int], q: torch.Tensor | None, generator: torch.Generator | None
) -> tuple[int, int]:
    """The accept/reject rule. p (k+1, V): target probabilities at each draft position and one past the
    last; q (k, V): the drafter's probabilities, None for deterministic drafts. Returns (number of drafts
    accepted, the next token)."""
    k = len(drafts)
    if k:
        idx = torch.arange(k, device=p.device)
        x = torch.tensor(list(drafts), device=p.device)
        px = p[idx, x]
        qx = q[idx, x] if q is not None else torch.ones_like(px)
        u = torch.rand(k, generator=generator, device=p.device)
        rejected = (u * qx >= px).nonzero()  # kept with probability min(1, p(x) / q(x))
        if len(rejected):
            i = int(rejected[0])
            qi = q[i] if q is not None else F.one_hot(x[i], p.shape[-1]).to(p.dtype)
            residual = (p[i] - qi).clamp_min(0)
            if float(residual.sum()) <= 0:  # p == q: cannot happen after a rejection but for rounding
                residual = p[i]
            return i, int(torch.multinomial(residual, 1, generator=generator))
    return k, int(torch.multinomial(p[k], 1, generator=generator))


def lookup_draft(history: Sequence[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of history's last n-gram (longest n first)."""
    t = torch.tensor(list(history))
    L = len(t)
    for n in range(min(max_ngram, L - 1), min_ngram - 1, -1):
        windows = t[: L - 1].unfold(0, n, 1)  # (L-n, n): every n-gram that has a token after it
        hits = (windows == t[L - n :]).all(1).nonzero()
        if len(hits):
            start = int(hits[-1]) + n
            return t[start : start + k].tolist()
    return []


class PromptLookup:
    """Drafts from n-grams of the prompt and the text so far; no model, no cache.

    A match of 2 tokens at least by default: after a 1-token match the drafts are mostly wrong (on DialogSum
    with SmolLM2, 20% of them accepted against 41% after 2-token matches), and each draft widens the verify
    forward, which costs more than a plain step (benchmarks/RESULTS.md)."""

    cache = None

    def __init__(self, k: int = 3, max_ngram: int = 3, min_ngram: int = 2) -> None:
        if k < 1 or not 1 <= min_ngram <= max_ngram:
            raise ConfigError(f"prompt lookup: k={k}, ngram {min_ngram}..{max_ngram}: expected k >= 1, 1 <= min <= max")
        self.k, self.max_ngram, self.min_ngram = k, max_ngram, min_ngram

    def propose(self, histories: Sequence[Sequence[int]], limits: Sequence[int],
                cfgs: Sequence[SamplingConfig], generators: Sequence[torch.Generator | None]) -> Drafts:
        return [lookup_draft(h, min(self.k, n), self.max_ngram, self.min_ngram) if n > 0 else []
                for h, n in zip(histories, limits)], None

    def accepted(self, n_accepted: Sequence[int]) -> None:
        pass


class DraftModel:
    """A smaller model with the target's vocabulary proposes k tokens per step, sampled with each row's
    settings. Its cache holds each row's tokens that are certain; what it has not seen yet (the pending
    token, and the last draft when all k were accepted) is fed at the start of the next proposal."""

    def __init__(self, model: Transformer, k: int = 4, vocab_size: int | None = None) -> None:
        if k < 1:
            raise ConfigError(f"draft model: k={k}: expected k >= 1")
        if vocab_size is not None and model.config.vocab_size != vocab_size:
            raise ConfigError(f"draft model vocabulary has {model.config.vocab_size} tokens, the target "
                              f"{vocab_size}: speculative decoding needs the same vocabulary")
        self.model, self.k = model.eval(), k
        self.device = model.device
        self.cache: KVCache | None = None
        self._fed = 0  # slots the last proposal added to the cache
        self._width = 0  # of which the catch-up feed (left-padded)

    def new_cache(self, rows: int, capacity: int) -> KVCache:
        return KVCache(self.model.config, rows, capacity, device=self.device,
                       dtype=_cache_dtype(self.model, self.device))

    def prefill(self, prompts: Sequence[Sequence[int]], pad_id: int, capacity: int | None = None) -> KVCache:
        """A cache holding `prompts` (left-padded), e.g. to attach rows from; `capacity` leaves room after."""
        tokens, mask = left_pad(prompts, pad_id)
        cache = self.new_cache(len(prompts), capacity or tokens.shape[1])
        self.model(tokens.to(self.device), mask.to(self.device), cache=cache, last_only=True)
        return cache

    @torch.inference_mode()
    def propose(self, histories: Sequence[Sequence[int]], limits: Sequence[int],
                cfgs: Sequence[SamplingConfig], generators: Sequence[torch.Generator | None]) -> Drafts:
        """k drafts per row (the caller caps what it keeps at `limits`) and their probabilities (B, k, V)."""
        cache, B = self.cache, len(histories)
        feeds = [list(h[int(cache.next_pos[r]) :]) for r, h in enumerate(histories)]
        tokens, mask = left_pad(feeds, 0)
        self._width = tokens.shape[1]
        self._fed = self._width + self.k - 1
        cache.make_room(self._fed, B)
        logits = self.model(tokens.to(self.device), mask.to(self.device), cache=cache, last_only=True)[:, -1]
        drafts: list[list[int]] = [[] for _ in range(B)]
        probs = []
        for i in range(self.k):
            q = row_probs(logits.float(), cfgs)
            probs.append(q)
            ids = _draw(q, generators)
            for r in range(B):
                drafts[r].append(ids[r])
            if i < self.k - 1:
                logits = self.model(torch.tensor(ids, device=self.device)[:, None], cache=cache, last_only=True)[:, -1]
        return [d[: max(n, 0)] for d, n in zip(drafts, limits)], torch.stack(probs, 1)

    def accepted(self, n_accepted: Sequence[int]) -> None:
        """Drop the drafts the target rejected (and the last one, which the draft cache never saw)."""
        keep = [self._width + min(a, self.k - 1) for a in n_accepted]
        self.cache.discard(torch.tensor(keep, device=self.device), self._fed)


Drafter = PromptLookup | DraftModel


def make_drafter(spec: str, k: int, target: Transformer, dtype: torch.dtype | None = None) -> Drafter:
    """`prompt-lookup`, or any model spec `load_model` takes (loaded beside the target, same vocabulary)."""
    if spec == "prompt-lookup":
        return PromptLookup(k)
    draft = load_model(spec, device=target.device, dtype=dtype or linear_dtype(target.output)).model
    return DraftModel(draft, k, vocab_size=target.config.vocab_size)


def _draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token per row of probs (B, V); rows sharing one generator draw in one call."""
    if all(g is generators[0] for g in generators):
        return torch.multinomial(probs, 1, generator=generators[0])[:, 0].tolist()
    return [int(torch.multinomial(p, 1, generator=g)) for p, g in zip(probs, generators)]


def verify(
    model: Transformer, cache: KVCache, pending: Sequence[int], drafts: Sequence[Sequence[int]],
    q: torch.Tensor | None, cfgs: Sequence[SamplingConfig], generators: Sequence[torch.Generator | None],
    fast: FastDecoder | None = None,
) -> tuple[list[list[int]], list[int]]:
    """Feed each row's pending token and drafts in one target forward (rows of the cache's first B; with
    `fast`, its few-call forward, lmlab/model/decode.py), apply the rule, drop rejected slots; returns each
    row's new tokens (accepted drafts + one more) and its number of accepted drafts."""
    B = len(pending)
    T = 1 + max(len(d) for d in drafts)
    device = cache.k.device
    tokens = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for r, (x, d) in enumerate(zip(pending, drafts)):
        tokens[r, : 1 + len(d)] = torch.tensor([x, *d])
        mask[r, : 1 + len(d)] = True
    tokens, mask = tokens.to(device), mask.to(device)
    cache.make_room(T, B)
    if fast is not None:
        logits = fast.forward_tokens(tokens, mask, cache) if T > 1 else fast.step(tokens[:, 0], cache)[:, None]
    else:
        logits = model(tokens, mask if T > 1 else None, cache=cache)
    p = row_probs(logits.float(), cfgs)  # (B, T, V)
    out, accepted = [], []
    for r, d in enumerate(drafts):
        a, token = accept_drafts(p[r, : len(d) + 1], d, q[r, : len(d)] if q is not None and d else None, generators[r])
        accepted.append(a)
        out.append([*d[:a], token])
    cache.discard(torch.tensor([a + 1 for a in accepted], device=device), T)
    return out, accepted


@torch.inference_mode()
def speculative_generate_ids(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    cfg: GenerationConfig,
    drafter: Drafter,
    *,
    pad_id: int = 0,
    on_token: Callable[[int, int], None] | None = None,
    should_stop: Callable[[int, list[int]], bool] | None = None,
    stats: dict | None = None,
) -> list[list[int]]:
    """`generate_ids` with speculative steps: new token ids for each prompt (stop ids excluded).

    `stats` (if given) receives steps, drafted and accepted token counts (acceptance rate = accepted /
    drafted)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    if cfg.sampling.repetition_penalty != 1.0:
        raise ConfigError("speculative decoding does not support a repetition penalty (the target "
                          "distribution of every draft position would depend on the drafts before it)")
    if model.config.sink_tokens:
        raise ConfigError("speculative decoding needs a plain KV cache, not attention sinks (sink_tokens > 0)")
    model.eval()
    device = model.device
    tokens, mask = left_pad(prompts, pad_id)
    B, longest = tokens.shape
    capacity = longest + cfg.max_new_tokens + drafter.k + 1  # + k: rows with fewer outputs draft more
    cache = KVCache(model.config, B, capacity, device=device, dtype=_cache_dtype(model, device))
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
    if isinstance(drafter, DraftModel):
        drafter.cache = drafter.prefill(prompts, pad_id, capacity + drafter.k + 1)
    logits = model(tokens.to(device), mask.to(device), cache=cache, last_only=True)[:, -1]
    fast = FastDecoder(model, B * (drafter.k + 1)) if fast_decode_supported(model, cache) else None
    first = _draw(token_probs(logits.float(), cfg.sampling), [generator])
    stop = set(cfg.stop_ids)
    outputs: list[list[int]] = [[] for _ in range(B)]
    histories = [list(p) for p in prompts]
    rows = list(range(B))  # original index of each live row
    counts = {"steps": 0, "drafted": 0, "accepted": 0}
    new = [[t] for t in first]
    while True:
        keep = []
        for j, row in enumerate(rows):
            if _emit(row, new[j], outputs, histories, stop, cfg.max_new_tokens, on_token, should_stop):
                keep.append(j)
        if not keep:
            break
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=device)
            cache.reorder(index)
            if drafter.cache is not None:
                drafter.cache.reorder(index)
            rows = [rows[j] for j in keep]
        live = [histories[r] for r in rows]
        limits = [cfg.max_new_tokens - len(outputs[r]) - 1 for r in rows]
        drafts, q = drafter.propose(live, limits, [cfg.sampling] * len(rows), [generator] * len(rows))
        new, accepted = verify(model, cache, [h[-1] for h in live], drafts, q, [cfg.sampling] * len(rows),
                               [generator] * len(rows), fast)
        drafter.accepted(accepted)
        counts["steps"] += 1
        counts["drafted"] += sum(map(len, drafts))
        counts["accepted"] += sum(accepted)
    if stats is not None:
        stats.update(counts)
    return outputs


def _emit(row: int, tokens: list[int], outputs: list[list[int]], histories: list[list[int]], stop: set[int],
          limit: int, on_token, should_stop) -> bool:
    """Append a step's tokens to a row until it ends; False once it has (stop id, stop string or length)."""
    for t in tokens:
        if t in stop:
            return False
        outputs[row].append(t)
        histories[row].append(t)
        if on_token:
            on_token(row, t)
        if (should_stop and should_stop(row, outputs[row])) or len(outputs[row]) >= limit:
            return False
    return True


class SpeculativeDecoder:
    """`generate_ids`'s signature around a drafter: pass as `generate(..., decoder=...)`."""

    def __init__(self, drafter: Drafter) -> None:
        self.drafter = drafter
        self.stats = {"steps": 0, "drafted": 0, "accepted": 0}

    def __call__(self, model: Transformer, prompts: Sequence[Sequence[int]], cfg: GenerationConfig, **kw) -> list[list[int]]:
        stats: dict = {}
        out = speculative_generate_ids(model, prompts, cfg, self.drafter, stats=stats, **kw)
        for key, value in stats.items():
            self.stats[key] += value
        return out
