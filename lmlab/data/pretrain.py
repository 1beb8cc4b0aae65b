"""Pretraining data: documents -> tokenizer -> token shards on disk -> batches.

Shards are flat np.memmap token arrays (uint16 when the vocabulary fits, else uint32) plus document
start offsets, cached under a folder named by a hash of the corpus bytes, the tokenizer identity and
the split settings, so a second run skips tokenization. Two ways to cut batches:

* `RandomWindows` (nanoGPT): seq_len+1 tokens at random offsets of the token stream.
* `PaddedChunks` (seed 003): each document cut into consecutive chunks; the last chunk is padded and
  its padding labels are IGNORE_INDEX, so padding never counts in the loss.

Both are pure functions of (step, micro-batch): the batch order depends only on the seed, which makes
resuming exact (the data position *is* the step) and gives every process of a DDP run its own slice of
the same global batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.data.batch import IGNORE_INDEX, Batch
from lmlab.data.corpus import read_documents
from lmlab.errors import DataError
from lmlab.fileio import atomic_replace_dir, atomic_write_text
from lmlab.tokenization import load_tokenizer
from lmlab.tokenization.char import CharTokenizer

SHARD_VERSION = 1


@dataclass
class TokenSplit:
    """One split: a flat token array and the start offset of each document (plus the end)."""

    tokens: np.ndarray
    doc_offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)


def default_cache_dir() -> Path:
    return Path(os.environ.get("LMLAB_CACHE", Path.home() / ".cache" / "lmlab")) / "tokens"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def build_shards(
    docs: list[str], digest: str, tokenizer: Any, tokenizer_id: str, *, cache_dir: str | Path = "",
    val_fraction: float = 0.1, val_docs: list[str] | None = None, val_digest: str = "",
    add_bos: bool = False, add_eos: bool = False,
) -> tuple[TokenSplit, TokenSplit]:
    """Tokenize (or reuse the cache) and split into train / val."""
    settings = dict(v=SHARD_VERSION, corpus=digest, val=val_digest, tok=tokenizer_id, bos=add_bos, eos=add_eos,
                    val_fraction=None if val_docs else val_fraction, vocab=tokenizer.vocab_size)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    folder = Path(cache_dir or default_cache_dir()) / key
    damage = cache_damage(folder, tokenizer.vocab_size) if (folder / "meta.json").is_file() else "missing"
    if damage != "missing" and damage:
        print(f"warning: token cache {folder} is damaged ({damage}); rebuilding it", file=sys.stderr)
    if damage:
        encode = lambda ds: _encode(ds, tokenizer, add_bos, add_eos)  # noqa: E731
        if val_docs:
            train, val = encode(docs), encode(val_docs)
        else:
            train, val = _split(*encode(docs), val_fraction)
        dtype = token_dtype(tokenizer.vocab_size)
        atomic_replace_dir(lambda tmp: _write(tmp, train, val, dtype, settings), folder)
    return _open(folder, "train"), _open(folder, "val")


def _encode(docs: list[str], tokenizer: Any, bos: bool, eos: bool) -> tuple[np.ndarray, np.ndarray]:
    pieces = [np.asarray(tokenizer.encode(d, bos=bos, eos=eos), dtype=np.int64) for d in docs]
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return (np.concatenate(pieces) if pieces else np.zeros(0, np.int64)), offsets


def _split(tokens: np.ndarray, offsets: np.ndarray, val_fraction: float) -> tuple[tuple, tuple]:
    """Hold out the last `val_fraction` of tokens, at a document boundary when documents are many."""
    if not 0 < val_fraction < 1:
        raise DataError(f"data.val_fraction={val_fraction}: expected a value between 0 and 1 (or set data.val_path)")
    cut = int(len(tokens) * (1 - val_fraction))
    inner = offsets[1:-1]
    if len(inner) >= 10:  # snap to the nearest document boundary
        cut = int(inner[np.abs(inner - cut).argmin()])
    head = np.concatenate([offsets[offsets < cut], [cut]])
    tail = np.concatenate([[0], offsets[offsets > cut] - cut])
    return (tokens[:cut], head), (tokens[cut:], tail)


def _write(tmp: Path, train: tuple, val: tuple, dtype: np.dtype, settings: dict) -> None:
    for name, (tokens, offsets) in (("train", train), ("val", val)):
        tokens.astype(dtype).tofile(tmp / f"{name}.bin")
        np.save(tmp / f"{name}_docs.npy", offsets.astype(np.int64))
    meta = dict(settings, dtype=dtype.name, n_train=int(len(train[0])), n_val=int(len(val[0])))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))


def _open(folder: Path, name: str) -> TokenSplit:
    dtype = np.dtype(json.loads((folder / "meta.json").read_text())["dtype"])
    path = folder / f"{name}.bin"
    tokens = np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)
    return TokenSplit(tokens, np.load(folder / f"{name}_docs.npy", allow_pickle=False))


VERIFIED = "verified.json"  # (size, mtime) of each .bin whose ids were last read and found in range


def cache_damage(folder: Path, vocab_size: int) -> str:
    """What is wrong with a token cache folder ("" when it is whole): every file present and readable, each
    split as long as meta.json says, document offsets that end at that length, and no id at or above the
    vocabulary (a truncated copy or a stray write must never train on part of a corpus or crash the
    embedding). The ids are read once per version of a file (a pass over its memory map); verified.json
    remembers the size and mtime they were read at."""
    try:
        verified = json.loads((folder / VERIFIED).read_text()) if (folder / VERIFIED).is_file() else {}
    except (OSError, ValueError):
        verified = {}
    seen = {}
    try:
        meta = json.loads((folder / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"])
        for name in ("train", "val"):
            split = _open(folder, name)
            n = int(meta[f"n_{name}"])
            if len(split) != n:
                return f"{name}.bin holds {len(split):,} tokens, meta.json says {n:,}"
            offsets = split.doc_offsets
            if offsets.ndim != 1 or not len(offsets) or offsets[0] != 0 or offsets[-1] != n or \
                    (np.diff(offsets) < 0).any():
                return f"{name}_docs.npy does not cut {name}.bin into documents"
            stat = (folder / f"{name}.bin").stat()
            seen[name] = [stat.st_size, stat.st_mtime_ns]
            if n and verified.get(name) != seen[name] and int(split.tokens.max()) >= vocab_size:
                return f"{name}.bin holds token id {int(split.tokens.max())}, the vocabulary has {vocab_size}"
        if dtype != token_dtype(vocab_size):
            return f"dtype {dtype} for a vocabulary of {vocab_size}"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{type(err).__name__}: {' '.join(str(err).split())[:120]}"
    if seen != verified:
        atomic_write_text(folder / VERIFIED, json.dumps(seen) + "\n")
    return ""


def check_length(split: TokenSplit, seq_len: int, name: str, source: str) -> None:
    if len(split) < seq_len + 1:
        raise DataError(
            f"{source}: the {name} split has {len(split)} tokens, shorter than one window of "
            f"seq_len+1={seq_len + 1} tokens; use more text or a shorter data.seq_len"
        )


# ----------------------------------------------------------------------------------------------------
# batches


@dataclass
class Layout:
    """Where this process's micro-batch sits inside the global batch of one optimizer step."""

    batch_size: int
    grad_accum: int = 1
    rank: int = 0
    world: int = 1

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world

    def offset(self, micro: int) -> int:
        return (micro * self.world + self.rank) * self.batch_size


class RandomWindows:
    """Windows of seq_len+1 tokens at offsets drawn from a generator seeded by (seed, step)."""

    def __init__(self, split: TokenSplit, seq_len: int, layout: Layout, seed: int) -> None:
        self.tokens, self.seq_len, self.layout, self.seed = split.tokens, seq_len, layout, seed

    def __call__(self, step: int, micro: int = 0) -> Batch:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.layout.global_batch)
        mine = starts[self.layout.offset(micro): self.layout.offset(micro) + self.layout.batch_size]
        rows = np.stack([self.tokens[s: s + self.seq_len + 1] for s in mine]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}


def chunk_spans(split: TokenSplit, seq_len: int) -> np.ndarray:
    """(start, length) of consecutive chunks of <= seq_len+1 tokens; stride seq_len so every token
    after a document's first is a target exactly once."""
    spans = []
    for a, b in zip(split.doc_offsets[:-1], split.doc_offsets[1:]):
        for s in range(int(a), int(b) - 1, seq_len):
            spans.append((s, min(seq_len + 1, int(b) - s)))
    return np.array(spans, dtype=np.int64).reshape(-1, 2)


def collate_chunks(tokens: np.ndarray, spans: np.ndarray, seq_len: int, pad_id: int) -> Batch:
    rows = np.full((len(spans), seq_len + 1), pad_id, dtype=np.int64)
    labels = np.full((len(spans), seq_len), IGNORE_INDEX, dtype=np.int64)
    for i, (s, n) in enumerate(spans):
        rows[i, :n] = tokens[s: s + n]
        labels[i, : n - 1] = rows[i, 1:n]
    return {"input_ids": torch.from_numpy(rows[:, :-1]), "labels": torch.from_numpy(labels)}


class PaddedChunks:
    """Consecutive per-document chunks in a fresh seeded order each epoch; short chunks padded."""

    def __init__(self, split: TokenSplit, seq_len: int, layout: Layout, seed: int, pad_id: int = 0) -> None:
        self.tokens, self.seq_len, self.layout, self.seed, self.pad_id = split.tokens, seq_len, layout, seed, pad_id
        self.spans = chunk_spans(split, seq_len)
        self._perm: tuple[int, np.ndarray] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.spans) / self.layout.global_batch)

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.spans)))
        return self._perm[1]

    def __call__(self, step: int, micro: int = 0) -> Batch:
        first = step * self.layout.global_batch + self.layout.offset(micro)
        index = [divmod(g, len(self.spans)) for g in range(first, first + self.layout.batch_size)]
        picked = self.spans[[self._order(epoch)[i] for epoch, i in index]]
        return collate_chunks(self.tokens, picked, self.seq_len, self.pad_id)


def token_eval_batches(split: TokenSplit, seq_len: int, batch_size: int, sampling: str, *, pad_id: int = 0,
                 max_batches: int = 0, rank: int = 0, world: int = 1) -> list[Batch]:
    """A fixed validation set: non-overlapping windows (random mode) or every chunk (chunks mode),
    in global batches of batch_size * world (the first `max_batches` of them; 0 = all), each process
    taking its slice, so the set does not depend on how many processes share it."""
    if sampling == "random":
        n = (len(split) - 1) // seq_len
        spans = np.stack([np.arange(n) * seq_len, np.full(n, seq_len + 1)], axis=1)
    else:
        spans = chunk_spans(split, seq_len)
    step = batch_size * world
    groups = [spans[i: i + step] for i in range(0, len(spans), step)]
    if max_batches:
        groups = groups[:max_batches]
    mine = [g[rank * batch_size: (rank + 1) * batch_size] for g in groups]
    return [collate_chunks(split.tokens, g, seq_len, pad_id) for g in mine if len(g)]


def build_tokenizer(spec: str, docs: list[str]) -> tuple[Any, str]:
    """(tokenizer, identity for the token cache): `char` is built from the corpus, else a path."""
    if spec == "char":
        return CharTokenizer.from_text("".join(docs)), "char"

    tokenizer = load_tokenizer(spec)  # first: a missing or unreadable path is its one-line error
    path = Path(spec)
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    return tokenizer, f"file:{digest.hexdigest()}"



def prepare_data(d: Any) -> tuple[Any, Any, Any]:
    """(tokenizer, train split, validation split) of a recipe's data section: documents -> tokenizer ->
    token shards (cached by content hash, so a second call is a lookup)."""

    docs, digest = read_documents(d.path, field=d.field, column=d.column, separator=d.doc_separator, hf_split=d.hf_split)
    val_docs, val_digest = read_documents(d.val_path, field=d.field, column=d.column, separator=d.doc_separator,
                                          hf_split=d.hf_split) if d.val_path else (None, "")
    tokenizer, tok_id = build_tokenizer(d.tokenizer, docs + (val_docs or []))
    train_split, val_split = build_shards(docs, digest, tokenizer, tok_id, cache_dir=d.cache_dir,
                                          val_fraction=d.val_fraction, val_docs=val_docs, val_digest=val_digest,
                                          add_bos=d.add_bos, add_eos=d.add_eos)
    return tokenizer, train_split, val_split
