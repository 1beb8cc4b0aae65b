"""Continuous batching: one decode loop over a shared KV cache that requests join and leave between steps.

Iteration-level scheduling as in Orca (Yu et al. 2022) and the slots of llama.cpp's server:
- every live sequence owns one row of one `KVCache` (rows 0..B-1, "rows as slots" in lmlab/model/kv_cache.py);
- between steps, cancelled or timed-out sequences leave, and waiting requests (a bounded queue) are prefilled
  together in one left-padded batch, attached to free rows, and sample their first token from the prefill;
- a step feeds every row's pending token (with speculation: pending token + drafts, lmlab/generation/
  speculative.py), samples each row with its request's own settings and seeded generator
  (lmlab.generation.sampling), and a finished sequence leaves at once: the last row moves into its gap;
- LoRA adapters per request: every forward runs under `adapters_per_row`, so one batch mixes adapters (the
  base matmul once, each adapter's low-rank update on its own rows).

The loop runs in the thread that calls `run()` (torch releases the GIL, so the HTTP event loop keeps serving
from another thread), or in a thread of its own after `start()`; each request reports through its `sink`
callback, called from the loop's thread. `lmlab serve` runs it on the main thread: with torch's OpenMP, a
second thread that issues parallel ops gets a second worker team, libgomp then counts more threads than CPUs
and lets idle workers sleep at once instead of spinning, so each of the decode step's ~1,000 small ops pays a
futex wake-up: the same step was 4x slower in a helper thread (~40 vs ~10 ms on 2 cores, measured).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from lmlab.adapters.lora import adapters_per_row, lora_modules, set_active_adapter
from lmlab.errors import ConfigError, LmlabError
from lmlab.generation.generate import _cache_dtype, cut_at_stop, left_pad
from lmlab.generation.sampling import SamplingConfig, sample_next
from lmlab.generation.speculative import Drafter, DraftModel, verify
from lmlab.model.decode import FastDecoder, fast_decode_supported
from lmlab.model.kv_cache import KVCache
from lmlab.model.quantize import KERNEL_MAX_ROWS
from lmlab.model.transformer import Transformer
from lmlab.tokenization import StreamDecoder

log = logging.getLogger("lmlab.serve")


class QueueFull(LmlabError):
    """The waiting queue is at its limit (the server answers 503)."""


@dataclass
class EngineConfig:
    """How many sequences run at once, how many wait, and for how long."""

    max_batch: int = 16
    """Rows of the shared KV cache: sequences decoded together (a request with n choices takes n)."""
    max_queue: int = 64
    """Requests that may wait for a free row; one more is refused (503)."""
    context: int = 2048
    """Tokens per sequence, prompt and output together (at most the model's max_seq_len)."""
    timeout_s: float = 600.0
    """A request still running after this many seconds ends with finish_reason "length"; one still
    waiting is refused."""
    prefill_tokens: int = 4096
    """Prompt tokens (padded) prefilled in one batch between two decode steps."""
    speculative_max_batch: int = 4
    """Speculate only while at most this many sequences are live: verification costs k+1 tokens per row,
    which a memory-bound step of a few rows hides and a large batch does not."""


@dataclass
class Request:
    """One prompt (token ids) to continue, with OpenAI's knobs."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0))
    seed: int | None = None
    """Choice i samples from a generator seeded with seed + i (None: a random seed)."""
    n: int = 1
    stop_strings: tuple[str, ...] = ()
    adapter: str | None = None
    logprobs: int | None = None
    """None: none; k >= 0: the chosen token's log-probability and the k most likely alternatives."""


@dataclass
class Delta:
    """New text of one choice; `finish_reason` is set on its last delta ("stop" or "length")."""

    index: int
    text: str
    logprobs: list[dict] | None = None  # {"token", "id", "logprob", "top": [(token, logprob), ...]} per token
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass
class Failed:
    """The request could not be served (status: HTTP status for the app)."""

    message: str
    status: int = 500


Sink = Callable[[Delta | Failed], None]


class Handle:
    """A submitted request: `cancel()` from any thread frees its rows before the next step."""

    def __init__(self, request: Request, sink: Sink, timeout_s: float) -> None:
        self.request, self.sink = request, sink
        self.deadline = time.monotonic() + timeout_s
        self.cancelled = False
        self.remaining = request.n  # choices not finished yet

    def cancel(self) -> None:
        self.cancelled = True


class _Seq:
    """One choice of one request, living in one cache row."""

    def __init__(self, handle: Handle, index: int, tokenizer) -> None:
        req = handle.request
        self.handle, self.index, self.req = handle, index, req
        self.generator = torch.Generator()
        self.generator.manual_seed(req.seed + index if req.seed is not None else torch.seed())
        self.history = list(req.prompt)  # prompt + generated ids, the pending token last
        self.out: list[int] = []
        self.decoder = StreamDecoder(tokenizer, context=req.prompt[-1:])  # after the prompt: its leading space kept
        self.text = ""  # decoded so far, before any stop-string cut
        self.sent = 0  # characters of text already reported
        self.done: str | None = None


class Engine:
    """The continuous-batching loop around one model (and its adapters, and an optional drafter)."""

    def __init__(self, model: Transformer, tokenizer, cfg: EngineConfig, drafter: Drafter | None = None) -> None:
        if model.config.sink_tokens:
            raise ConfigError("lmlab serve needs a plain KV cache: models with attention sinks are not supported")
        if cfg.context > model.config.max_seq_len and model.config.pos == "learned":
            raise ConfigError(f"context {cfg.context} > the model's learned positions ({model.config.max_seq_len})")
        self.model, self.tokenizer, self.cfg, self.drafter = model.eval(), tokenizer, cfg, drafter
        self.device = model.device
        self.stop_ids = set(tokenizer.stop_ids)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self.has_adapters = any(True for _ in lora_modules(model))
        if self.has_adapters:
            set_active_adapter(model, None)  # plain forwards run the base; rows pick adapters per step
        k = drafter.k if drafter is not None else 0
        self.capacity = cfg.context + k + 1 + 256  # slack: the views move forward ~256 steps between repacks
        self.cache = self._new_cache()
        # the few-call decode step of `lmlab generate` (lmlab/model/decode.py), one per kernel choice (batch
        # sizes up to KERNEL_MAX_ROWS call the quantized kernels); not with adapters: its fused kernels skip LoRA
        self._fast: dict[bool, FastDecoder] | None = \
            {} if not self.has_adapters and fast_decode_supported(model, self.cache) else None
        if isinstance(drafter, DraftModel):
            drafter.cache = drafter.new_cache(cfg.max_batch, self.capacity + k + 1)
        self.rows: list[_Seq] = []
        self.waiting: deque[Handle] = deque()
        self.stats = {"steps": 0, "tokens": 0, "prefill_tokens": 0, "drafted": 0, "accepted": 0}
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="lmlab-engine", daemon=True)

    def _new_cache(self) -> KVCache:
        return KVCache(self.model.config, self.cfg.max_batch, self.capacity, device=self.device,
                       dtype=_cache_dtype(self.model, self.device))

    # ---- called from other threads

    def start(self) -> Engine:
        """The loop in a thread of its own (tests, embedding); see the module docstring for why `run` is faster."""
        self._thread.start()
        return self

    def run(self) -> None:
        """The loop in the calling thread, until `close()` (from another thread)."""
        self._run()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread.is_alive():  # started by start(); after run() the caller's thread returns by itself
            self._thread.join(timeout=30)

    def submit(self, requests: Sequence[Request], sinks: Sequence[Sink], timeout_s: float | None = None) -> list[Handle]:
        """Queue requests (all or none): QueueFull when the queue cannot take them all."""
        for r in requests:
            if not 1 <= r.n <= self.cfg.max_batch:
                raise ConfigError(f"n={r.n}: expected 1 to {self.cfg.max_batch} (the server's --parallel)")
            if not 0 < len(r.prompt) < self.cfg.context:
                raise ConfigError(f"the prompt has {len(r.prompt)} tokens: expected 1 to {self.cfg.context - 1} "
                                  f"(the context is {self.cfg.context} tokens)")
        handles = [Handle(r, s, timeout_s or self.cfg.timeout_s) for r, s in zip(requests, sinks)]
        with self._cond:
            if len(self.waiting) + len(handles) > self.cfg.max_queue:
                raise QueueFull(f"server busy: {len(self.waiting)} requests already waiting "
                                f"(--max-queue {self.cfg.max_queue}); retry later")
            self.waiting.extend(handles)
            self._cond.notify()
        return handles

    def load(self) -> dict[str, int]:
        with self._cond:
            return {"running": len(self.rows), "waiting": len(self.waiting), "slots": self.cfg.max_batch}

    # ---- the engine thread

    @torch.inference_mode()
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self.waiting and not self.rows:
                    self._cond.wait()
                if self._closed:
                    return
                admitted = self._admit()
            try:
                self._expire()
                if admitted:
                    self._prefill(admitted)
                if self.rows:
                    self._step()
            except Exception:  # a bug must not take the server down: fail what is live, start clean
                log.error("engine step failed:\n%s", traceback.format_exc())
                live = {id(h): h for h in [s.handle for s in self.rows] + admitted if h.remaining > 0}
                for h in live.values():
                    h.sink(Failed("internal error in the decode loop (see the server log)"))
                self.rows = []
                self.cache = self._new_cache()
                if isinstance(self.drafter, DraftModel):
                    self.drafter.cache = self.drafter.new_cache(self.cfg.max_batch, self.capacity + self.drafter.k + 1)

    def _admit(self) -> list[Handle]:
        """Waiting requests that fit in the free rows and the prefill budget, in arrival order."""
        free, budget, out = self.cfg.max_batch - len(self.rows), self.cfg.prefill_tokens, []
        now = time.monotonic()
        while self.waiting:
            h = self.waiting[0]
            if h.cancelled or now > h.deadline:
                self.waiting.popleft()
                if not h.cancelled:
                    h.sink(Failed("timed out while waiting for a free slot", status=503))
                continue
            longest = max([len(x.request.prompt) for x in out] + [len(h.request.prompt)])
            if h.request.n > free or (out and longest * (len(out) + 1) > budget):
                break
            out.append(self.waiting.popleft())
            free -= h.request.n
        return out

    def _expire(self) -> None:
        """Cancelled requests leave; past their deadline they end as if out of tokens."""
        now = time.monotonic()
        for s in self.rows:
            if s.handle.cancelled:
                s.done = "cancelled"
            elif now > s.handle.deadline:
                self._finish(s, "length")
        self._remove_finished()

    def _adapters(self, names: list[str | None]):
        if self.has_adapters and any(n is not None for n in names):
            return adapters_per_row(self.model, names)
        return nullcontext()

    def _prefill(self, handles: list[Handle]) -> None:
        prompts = [h.request.prompt for h in handles]
        tokens, mask = left_pad(prompts, self.pad_id)
        tmp = KVCache(self.model.config, len(prompts), tokens.shape[1], device=self.device, dtype=self.cache.k.dtype)
        with self._adapters([h.request.adapter for h in handles]):
            logits = self.model(tokens.to(self.device), mask.to(self.device), cache=tmp, last_only=True)[:, -1]
        draft = self.drafter.prefill(prompts, self.pad_id) if isinstance(self.drafter, DraftModel) else None
        self.stats["prefill_tokens"] += tokens.numel()
        for j, h in enumerate(handles):
            for i in range(h.request.n):
                s = _Seq(h, i, self.tokenizer)
                row = len(self.rows)
                self.cache.attach(row, tmp, j, row)
                if draft is not None:
                    self.drafter.cache.attach(row, draft, j, row)
                self.rows.append(s)
                self._advance(s, [self._sample(logits[j : j + 1], [s])[0]], logits[j : j + 1])
        self._remove_finished()

    def _step(self) -> None:
        rows = self.rows
        speculate = (self.drafter is not None and len(rows) <= self.cfg.speculative_max_batch
                     and all(s.req.logprobs is None for s in rows))
        if speculate:
            return self._speculative_step()
        self.cache.make_room(1, len(rows))
        tokens = torch.tensor([s.history[-1] for s in rows], device=self.device)[:, None]
        fast = self._fast_decoder(len(rows))
        if fast is not None:
            logits = fast.step(tokens[:, 0], self.cache)
        else:
            with self._adapters([s.req.adapter for s in rows]):
                logits = self.model(tokens, cache=self.cache, last_only=True)[:, -1]
        for s, token, i in zip(rows, self._sample(logits, rows), range(len(rows))):
            self._advance(s, [token], logits[i : i + 1])
        self.stats["steps"] += 1
        self._remove_finished()

    def _speculative_step(self) -> None:
        rows = self.rows
        limits = [self._room(s) - 1 for s in rows]
        cfgs, gens = [s.req.sampling for s in rows], [s.generator for s in rows]
        drafts, q = self.drafter.propose([s.history for s in rows], limits, cfgs, gens)
        fast = self._fast_decoder(len(rows) * (self.drafter.k + 1))
        with self._adapters([s.req.adapter for s in rows]):
            new, accepted = verify(self.model, self.cache, [s.history[-1] for s in rows], drafts, q, cfgs, gens, fast)
        self.drafter.accepted(accepted)
        for s, tokens in zip(rows, new):
            self._advance(s, tokens, None)
        self.stats["steps"] += 1
        self.stats["drafted"] += sum(map(len, drafts))
        self.stats["accepted"] += sum(accepted)
        self._remove_finished()

    def _fast_decoder(self, tokens: int) -> FastDecoder | None:
        """The few-call step for a forward of this many tokens (None: the model's forward)."""
        if self._fast is None:
            return None
        small = tokens <= KERNEL_MAX_ROWS
        return self._fast.get(small) or self._fast.setdefault(small, FastDecoder(self.model, tokens))

    def _sample(self, logits: torch.Tensor, rows: list[_Seq]) -> list[int]:
        """Each row with its own settings and generator; greedy rows in one argmax."""
        out = [0] * len(rows)
        greedy = [i for i, s in enumerate(rows) if s.req.sampling.greedy]
        if greedy:
            index = torch.tensor(greedy, device=logits.device)
            for i, t in zip(greedy, sample_next(logits[index], SamplingConfig(temperature=0)).tolist()):
                out[i] = t
        for i, s in enumerate(rows):
            if not s.req.sampling.greedy:
                out[i] = int(sample_next(logits[i : i + 1], s.req.sampling, s.generator)[0])
        return out

    def _room(self, s: _Seq) -> int:
        """Tokens this sequence may still produce (max_tokens, the context)."""
        return min(s.req.max_tokens - len(s.out), self.cfg.context - len(s.history))

    def _advance(self, s: _Seq, tokens: list[int], logits: torch.Tensor | None) -> None:
        """Take a step's tokens for one sequence until it ends; report the new text."""
        entries = [] if s.req.logprobs is not None and logits is not None else None
        reason = None
        for t in tokens:
            if self._room(s) <= 0:
                reason = "length"
                break
            if t in self.stop_ids:
                reason = "stop"
                break
            s.out.append(t)
            s.history.append(t)
            self.stats["tokens"] += 1
            s.text += s.decoder.put(t)
            if entries is not None:
                entries.append(self._logprob_entry(t, logits[0], s.req.logprobs))
            if s.req.stop_strings and cut_at_stop(s.text, s.req.stop_strings)[1]:
                reason = "stop"
                break
        if reason is None and self._room(s) <= 0:
            reason = "length"
        if reason is not None:
            self._finish(s, reason, entries)
            return
        safe = len(s.text) - _held_back(s.text, s.req.stop_strings)
        if safe > s.sent or entries:
            s.handle.sink(Delta(s.index, s.text[s.sent : safe], entries))
            s.sent = max(s.sent, safe)

    def _finish(self, s: _Seq, reason: str, entries: list[dict] | None = None) -> None:
        """The last delta: what the stop string leaves of the text, not reported yet."""
        if s.done is not None:
            return
        s.done = reason
        final = cut_at_stop(s.text + s.decoder.flush(), s.req.stop_strings)[0]
        s.handle.remaining -= 1
        s.handle.sink(Delta(s.index, final[s.sent :], entries, reason, completion_tokens=len(s.out)))
        s.sent = len(final)

    def _logprob_entry(self, token: int, logits: torch.Tensor, top: int) -> dict:
        lp = logits.float().log_softmax(-1)
        entry = {"id": token, "token": self.tokenizer.decode([token]), "logprob": float(lp[token]), "top": []}
        if top:
            values, ids = lp.topk(top)
            entry["top"] = [(self.tokenizer.decode([i]), float(v)) for v, i in zip(values.tolist(), ids.tolist())]
        return entry

    def _remove_finished(self) -> None:
        """Finished rows leave at once; the last live row moves into each gap."""
        caches = [self.cache] + ([self.drafter.cache] if isinstance(self.drafter, DraftModel) else [])
        i = 0
        while i < len(self.rows):
            if self.rows[i].done is None:
                i += 1
                continue
            last = len(self.rows) - 1
            if i != last:
                for c in caches:
                    c.move_row(last, i)
                self.rows[i] = self.rows[last]
            self.rows.pop()


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of text's longest suffix that could still grow into a stop string: not reported yet, so
    that streamed text never includes what the stop string will cut."""
    held = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:n]):
                held = n
                break
    return held
