"""Autoregressive generation over token ids, with a KV cache and batches of different lengths.

`generate_ids` knows token ids only: prompts are left-padded into one batch (with an attention mask, so
every row gives the same tokens as it would alone), prefilled once, then decoded one token per step
through the preallocated cache. `generate` adds text: tokenizer, chat template, stop strings, streaming.
Several samples of one prompt (best-of-N, verifiers) prefill it once: its cache rows are copied to the K
sample rows after the prefill, and each row can draw from its own seeded generator.
Past the trained context, models with attention sinks keep decoding through the streaming cache.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from lmlab.errors import ConfigError
from lmlab.generation.sampling import SamplingConfig, sample_next, sample_next_rows
from lmlab.model.decode import FastDecoder, fast_decode_supported
from lmlab.model.kv_cache import KVCache
from lmlab.model.quantize import linear_dtype
from lmlab.model.transformer import Transformer
from lmlab.tokenization import StreamDecoder, decode_continuation


@dataclass
class GenerationConfig:
    """What to generate and when to stop."""

    max_new_tokens: int = 128
    """Upper bound on generated tokens per prompt."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Temperature, top-k, top-p, min-p, epsilon, repetition penalty."""
    stop_ids: tuple[int, ...] = ()
    """Token ids that end a sequence (the tokenizer's EOS / end-of-turn ids are added by `generate`)."""
    stop_strings: tuple[str, ...] = ()
    """Strings that end a sequence; the output is cut before them."""
    seed: int | None = None
    """Seed of the sampling generator: the same seed reproduces the same samples."""
    truncate_prompt: bool = False
    """A prompt too long for the model's context keeps its last tokens (with a warning); else it is an error."""
    past_context: bool = False
    """Decode past the trained context (the long-context experiment). Otherwise generation stops where the
    context is full, with a warning; models with attention sinks (a streaming cache) always go on."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens}: expected at least 1")
        if any(not s for s in self.stop_strings):  # "" is found at offset 0: every output would be empty
            raise ConfigError(f"stop_strings={list(self.stop_strings)}: an empty stop string ends every output at once")


TokenCallback = Callable[[int, int], None]  # (row, token id)


def _prefill_chunk(cache: KVCache) -> int | None:
    """Largest prompt chunk the cache accepts at once (streaming caches evict between chunks)."""
    return cache.capacity - cache.sinks if cache.streaming else None


@torch.inference_mode()
def generate_ids(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    cfg: GenerationConfig,
    *,
    pad_id: int = 0,
    on_token: TokenCallback | None = None,
    should_stop: Callable[[int, list[int]], bool] | None = None,
    num_samples: int = 1,
    row_seeds: Sequence[int] | None = None,
) -> list[list[int]]:
    """New token ids for each prompt (stop ids excluded).

    `on_token(row, id)` is called for each accepted token (streaming); `should_stop(row, new_ids)`
    lets the caller end a row early (stop strings). num_samples: K continuations of every prompt, output
    row i*K+k; the prompts are prefilled once and their cache rows copied K times. row_seeds: one seed per
    output row; row r then draws from its own generator and gives the tokens its prompt gives alone with
    GenerationConfig(seed=row_seeds[r]) (without it, all rows share one generator seeded cfg.seed).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    prompts, max_new = fit_context(model, prompts, cfg)
    cfg = replace(cfg, max_new_tokens=max_new)
    model.eval()
    device = model.norm.weight.device
    tokens, mask = left_pad(prompts, pad_id)
    B, longest = tokens.shape
    tokens, mask = tokens.to(device), mask.to(device)
    cache = KVCache(model.config, B, longest + cfg.max_new_tokens, device=device, dtype=_cache_dtype(model, device))
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
    seen = None
    if cfg.sampling.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, tokens, mask)

    logits = _prefill(model, cache, tokens, mask)[:, -1]
    if num_samples > 1:  # the K samples of a prompt continue from one prefill
        index = torch.arange(B, device=device).repeat_interleave(num_samples)
        cache.reorder(index)
        logits, seen, B = logits[index], seen[index] if seen is not None else None, B * num_samples
    generators = None
    if row_seeds is not None:
        if len(row_seeds) != B:
            raise ValueError(f"{len(row_seeds)} row_seeds for {B} output rows")
        generators = [torch.Generator(device=device).manual_seed(s) for s in row_seeds]
    fast = FastDecoder(model, B) if fast_decode_supported(model, cache) else None  # lmlab/model/decode.py
    outputs: list[list[int]] = [[] for _ in range(B)]
    rows = list(range(B))  # original index of each live batch row
    stop = torch.tensor(sorted(set(cfg.stop_ids)) or [-1], device=device)
    for _ in range(cfg.max_new_tokens):
        if generators is None:
            next_ids = sample_next(logits, cfg.sampling, generator, seen)
        else:
            next_ids = sample_next_rows(logits, cfg.sampling, generators, seen)
        ended = torch.isin(next_ids, stop).tolist()
        ids = next_ids.tolist()
        keep = []
        for j, row in enumerate(rows):
            if not ended[j]:
                outputs[row].append(ids[j])
                if on_token:
                    on_token(row, ids[j])
                if not (should_stop and should_stop(row, outputs[row])):
                    keep.append(j)
        if not keep:
            break
        if len(keep) < len(rows):  # drop finished rows so they cost nothing more
            index = torch.tensor(keep, device=device)
            cache.reorder(index)
            next_ids = next_ids[index]
            seen = seen[index] if seen is not None else None
            generators = [generators[j] for j in keep] if generators is not None else None
            rows = [rows[j] for j in keep]
        if seen is not None:
            seen.scatter_(1, next_ids[:, None], True)
        logits = fast.step(next_ids, cache) if fast else model(next_ids[:, None], cache=cache, last_only=True)[:, -1]
    return outputs


def fit_context(model: Transformer, prompts: Sequence[Sequence[int]],
                cfg: GenerationConfig) -> tuple[list[list[int]], int]:
    """(prompts, max_new_tokens) that stay inside the model's trained context: past it a model without
    attention sinks decodes garbage (RoPE) or has no position at all (learned positions)."""
    prompts = [list(p) for p in prompts]
    context = model.config.max_seq_len
    if model.config.sink_tokens or cfg.past_context:
        return prompts, cfg.max_new_tokens
    keep = max(1, context - cfg.max_new_tokens) if cfg.truncate_prompt else context - 1
    long = [len(p) for p in prompts if len(p) > keep]
    if long and not cfg.truncate_prompt:
        raise ConfigError(f"a prompt of {max(long)} tokens leaves no room in the model's context of {context} "
                          "tokens; shorten it, or keep its last tokens with truncate_prompt (lmlab generate "
                          "--truncate-prompt)")
    if long:
        prompts = [p[-keep:] for p in prompts]
        print(f"warning: {len(long)} prompt(s) of up to {max(long)} tokens truncated to their last {keep} tokens "
              f"to fit the model's context of {context}", file=sys.stderr)
    longest = max(len(p) for p in prompts)
    if longest + cfg.max_new_tokens > context:
        print(f"warning: generating at most {context - longest} new tokens, not {cfg.max_new_tokens}: a prompt of "
              f"{longest} tokens fills the rest of the model's context of {context}", file=sys.stderr)
    return prompts, min(cfg.max_new_tokens, context - longest)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, mask) of shape (B, longest), prompts right-aligned so every row's next token follows the
    same last index; mask is True on real tokens."""
    longest = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p) :] = torch.tensor(list(p))
        mask[i, longest - len(p) :] = True
    return tokens, mask


def length_batches(lengths: Sequence[int], batch_size: int | None) -> list[list[int]]:
    """Indices grouped into batches of `batch_size` by increasing length (little padding); None = one
    batch in the given order."""
    if batch_size is None:
        return [list(range(len(lengths)))]
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected a positive integer or None")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _cache_dtype(model: Transformer, device: torch.device) -> torch.dtype:
    """The weights' dtype, except fp32 on CPU: the decode step's small attention matmuls run about
    3x faster in fp32 there than in bf16 (measured), and the cache of a small model is small."""
    if device.type == "cpu":
        return torch.float32
    return linear_dtype(model.output)


def _prefill(model: Transformer, cache: KVCache, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    chunk = _prefill_chunk(cache) or tokens.shape[1]
    for start in range(0, tokens.shape[1], chunk):
        logits = model(tokens[:, start : start + chunk], mask[:, start : start + chunk], cache=cache, last_only=True)
    return logits


TextCallback = Callable[[int, str], None]  # (row, new text)


def encode_prompt(tokenizer, prompt: str, *, chat: bool = False, system: str | None = None) -> list[int]:
    """Prompt text -> ids: the chat template for instruct models, BOS where the model expects one."""
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = tokenizer.encode(prompt, bos=bool(tokenizer.add_bos and tokenizer.bos_id is not None))
    if not ids:  # the empty prompt starts from BOS (llama2.c's unconditional sampling)
        ids = [tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id]
    return ids


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """A conversation ([{"role", "content"}, ...]) -> ids: the chat template with the assistant's turn
    opened, then encode_prompt's BOS rule (multi-turn chat: the server, `lmlab generate --chat`)."""
    return encode_prompt(tokenizer, tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """Text before the earliest stop string, and whether one was found."""
    cuts = [i for s in stop_strings if (i := text.find(s)) >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def generate(
    model: Transformer,
    tokenizer,
    prompts: Sequence[str],
    cfg: GenerationConfig,
    *,
    chat: bool = False,
    system: str | None = None,
    stream: TextCallback | None = None,
    batch_size: int | None = None,
    decoder: Callable[..., list[list[int]]] | None = None,
) -> list[str]:
    """Generated text for each prompt (stop strings and stop tokens excluded).

    batch_size: None decodes every prompt in one left-padded batch. With a size, prompts are sorted by
    length and run in batches of that many, so an evaluation over hundreds of prompts neither pads them
    all to the longest nor holds one huge cache; outputs come back in the prompts' order. Greedy outputs
    do not depend on it; sampled ones do (each batch draws from the same seed).
    decoder: replaces `generate_ids` (same signature), e.g. lmlab.generation.speculative.SpeculativeDecoder.
    """

    ids = [encode_prompt(tokenizer, p, chat=chat, system=system) for p in prompts]
    batches = length_batches([len(x) for x in ids], batch_size)
    stop_ids = tuple(set(cfg.stop_ids) | set(tokenizer.stop_ids))
    cfg = replace(cfg, stop_ids=stop_ids, stop_strings=tuple(cfg.stop_strings))
    decoders = [StreamDecoder(tokenizer, context=x[-1:]) for x in ids]  # after the prompt: its leading space kept
    texts = ["" for _ in prompts]

    def on_token(row: int, token: int) -> None:
        piece = decoders[row].put(token)
        texts[row] += piece
        if stream and piece:
            stream(row, piece)

    def should_stop(row: int, _new: list[int]) -> bool:
        return cut_at_stop(texts[row], cfg.stop_strings)[1]

    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    outputs: list[list[int]] = [[] for _ in ids]
    for rows in batches:  # batch row j is prompt rows[j]
        new = (decoder or generate_ids)(
            model, [ids[i] for i in rows], cfg, pad_id=pad,
            on_token=lambda j, token, rows=rows: on_token(rows[j], token),
            should_stop=(lambda j, new_ids, rows=rows: should_stop(rows[j], new_ids)) if cfg.stop_strings else None,
        )
        for i, out in zip(rows, new):
            outputs[i] = out
    texts = [decode_continuation(tokenizer, x[-1:], out) for x, out in zip(ids, outputs)]
    return [cut_at_stop(text, cfg.stop_strings)[0] for text in texts]
