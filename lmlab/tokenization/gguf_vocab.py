"""Tokenizers stored inside GGUF files (llama.cpp), rebuilt from the `tokenizer.ggml.*` metadata.

Two kinds, by `tokenizer.ggml.model`:
  "gpt2"  byte-level BPE from tokens + merges; the split regex comes from `tokenizer.ggml.pre`, as in
          llama.cpp's llama-vocab.cpp and transformers' integrations/gguf/gguf_tokenizer_mapping.py.
  "llama" SentencePiece BPE from tokens + scores + token types, rebuilt as a real `.model`.
`gguf.GGUFReader` parses every string of the vocabulary into numpy views (about 1.5 s for
SmolLM2's 49k tokens + 49k merges), so `read_gguf_metadata` walks only the key/value header with
`struct` (lmlab.gguf_file), which takes a few tens of milliseconds.
"""

from __future__ import annotations

import mmap
import warnings
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, models, pre_tokenizers

from lmlab.errors import CheckpointError
from lmlab.tokenization.base import Tokenizer
from lmlab.tokenization.hf import HFTokenizer, byte_level_tokenizer
from lmlab.tokenization.spm import BYTE, CONTROL, USER_DEFINED, SentencePieceTokenizer, sentencepiece_proto
from lmlab.gguf_file import read_kv

# ---- the GGUF key/value header (walked by lmlab.gguf_file)

def read_gguf_metadata(path: str | Path, prefixes: tuple[str, ...] = ("tokenizer.", "general.")) -> dict[str, Any]:
    """The metadata values whose keys start with one of `prefixes` (others are skipped, not decoded)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file not found")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return read_kv(buf, path, prefixes)[0]


def metadata_from_reader(reader) -> dict[str, Any]:
    """The same dict from an already-open `gguf.GGUFReader` (the model loader has one)."""
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith(("tokenizer.", "general."))}


# ---- building the tokenizer

def tokenizer_from_gguf(source) -> Tokenizer:
    """From a `gguf.GGUFReader`, a GGUF path, or a metadata dict (see `read_gguf_metadata`)."""
    if isinstance(source, (str, Path)):
        meta, where = read_gguf_metadata(source), str(source)
    elif isinstance(source, Mapping):
        meta, where = source, "GGUF metadata"
    else:
        meta, where = metadata_from_reader(source), str(getattr(source, "path", "GGUF reader"))
    model = meta.get("tokenizer.ggml.model")
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens"):
        if key not in meta:
            raise CheckpointError(f"{where}: no {key} in the GGUF metadata (expected an embedded tokenizer)")
    if model == "gpt2":
        tok = _byte_level(meta, where)
    elif model == "llama":
        tok = _sentencepiece(meta, where)
    else:
        raise CheckpointError(f"{where}: tokenizer.ggml.model {model!r} is not supported (expected 'gpt2' or 'llama')")
    tok.chat_template = meta.get("tokenizer.chat_template")
    for name in ("bos", "eos", "pad"):
        if (i := meta.get(f"tokenizer.ggml.{_ID_KEYS[name]}")) is not None:
            setattr(tok, f"{name}_id", int(i))
    tok.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama"))
    tok.__dict__.pop("stop_ids", None)
    return tok


_ID_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id"}

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> the regexes llama.cpp splits with, in order (llama-vocab.cpp), and whether
# whole words found in the vocabulary skip the merges (llama.cpp's ignore_merges, Llama 3 only).
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    **dict.fromkeys(("default", "gpt-2", "gpt2", "mpt", "olmo", "jais", "phi-2"), ((_GPT2_SPLIT,), False)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
                    ((r"\p{N}", _GPT2_SPLIT), False)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "smaug-bpe", "dbrx"),
                    ((_LLAMA3_SPLIT,), True)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), ((_QWEN2_SPLIT,), False)),
}


def pre_tokenizer(pre: str, where: str):
    """The pre-tokenizer (regex splits, then byte-level) llama.cpp uses for `tokenizer.ggml.pre`, and its ignore_merges."""
    if pre not in PRE_TOKENIZERS:
        warnings.warn(f"{where}: unknown tokenizer.ggml.pre {pre!r}; splitting with the GPT-2 regex", stacklevel=3)
        pre = "gpt-2"
    splits, ignore_merges = PRE_TOKENIZERS[pre]
    steps = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return pre_tokenizers.Sequence([*steps, byte_level]), ignore_merges


@lru_cache(maxsize=1)
def _byte_alphabet() -> tuple[dict[int, str], frozenset[str]]:
    """GPT-2's bytes_to_unicode: every byte as a printable character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    mapping = {b: chr(b) for b in keep} | {b: chr(256 + n) for n, b in enumerate(extra)}
    return mapping, frozenset(mapping.values())


def _byte_level(meta: Mapping[str, Any], where: str) -> HFTokenizer:
    """Byte-level BPE; control tokens (type 3) become special tokens, user-defined (4) added tokens."""
    if "tokenizer.ggml.merges" not in meta:
        raise CheckpointError(f"{where}: a 'gpt2' GGUF tokenizer needs tokenizer.ggml.merges")
    mapping, alphabet = _byte_alphabet()
    tokens = list(meta["tokenizer.ggml.tokens"])
    for i, t in enumerate(tokens):  # a token written in plain text (not the byte alphabet) is respelled
        if not alphabet.issuperset(t):
            tokens[i] = "".join(mapping[b] for b in t.encode("utf-8"))
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    pre, ignore_merges = pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"), where)
    tok = byte_level_tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                          ignore_merges=ignore_merges), pre)
    types = meta.get("tokenizer.ggml.token_type") or []
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
                            if k == CONTROL and alphabet.issuperset(t)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == USER_DEFINED])
    return HFTokenizer(tok, "gguf")


def _sentencepiece(meta: Mapping[str, Any], where: str) -> SentencePieceTokenizer:
    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None:
        raise CheckpointError(f"{where}: a 'llama' GGUF tokenizer needs tokenizer.ggml.scores")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    ids = {name: int(meta.get(f"tokenizer.ggml.{key}", default)) for name, key, default in
           (("unk_id", "unknown_token_id", 0), ("bos_id", "bos_token_id", 1), ("eos_id", "eos_token_id", 2),
            ("pad_id", "padding_token_id", -1))}
    charsmap = meta.get("tokenizer.ggml.precompiled_charsmap")
    proto = sentencepiece_proto(list(zip(tokens, scores, types)), **ids,
                                add_dummy_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
                                precompiled_charsmap=bytes(charsmap) if charsmap else None)
    if not any(k == BYTE for k in types):
        warnings.warn(f"{where}: no byte tokens; characters outside the vocabulary encode as <unk>", stacklevel=3)
    return SentencePieceTokenizer(proto, source=where, special_in_text=True)
