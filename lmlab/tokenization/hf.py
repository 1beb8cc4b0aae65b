"""Tokenizers run by the Hugging Face `tokenizers` library: `tokenizer.json`, GPT-2's vocab.json +
merges.txt, GGUF byte-level vocabularies, and byte-level BPE trained here (`train_bpe`).

Byte-level BPE: Radford et al. 2019 (GPT-2), Sennrich et al. 2016 (BPE).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as RustTokenizer

from lmlab.errors import CheckpointError, DataError
from lmlab.tokenization.base import Tokenizer, atomic_write

JSON_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
EOT = "<|endoftext|>"


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` plus the special ids and chat template it does not store itself.

    `kind` records where it came from ("hf", "gpt2", "bpe", "gguf"); all save as tokenizer.json.
    """

    def __init__(self, tok: RustTokenizer, kind: str = "hf", *, bos_id: int | None = None,
                 eos_id: int | None = None, pad_id: int | None = None, chat_template: str | None = None,
                 add_bos: bool = False):
        self.tok, self.kind = tok, kind
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.chat_template, self.add_bos = chat_template, add_bos

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Special tokens are shown (as transformers' default); pass skip_special_tokens to drop them."""
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        return self.tok.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def _save_files(self, directory: Path) -> None:
        atomic_write(directory / JSON_FILE, self.tok.to_str())


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read JSON ({err})") from err


def _token_content(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(directory: Path, config: dict) -> str | None:
    """From chat_template.jinja (newer transformers) or tokenizer_config.json (a string or named list)."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def from_tokenizer_json(path: str | Path) -> HFTokenizer:
    """A tokenizer.json file (or its folder), with special tokens/template from tokenizer_config.json."""
    path = Path(path)
    file = path / JSON_FILE if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"{file}: not found (expected a Hugging Face tokenizer.json)")
    try:
        tok = RustTokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
        raise CheckpointError(f"{file}: not a valid Hugging Face tokenizer.json ({err})") from err
    config_file = file.parent / CONFIG_FILE
    config = _read_json(config_file) if config_file.is_file() else {}

    def special_id(name: str) -> int | None:
        token = _token_content(config.get(name))
        return None if token is None else tok.token_to_id(token)

    return HFTokenizer(tok, "hf", bos_id=special_id("bos_token"), eos_id=special_id("eos_token"),
                       pad_id=special_id("pad_token"), chat_template=_chat_template(file.parent, config),
                       add_bos=bool(config.get("add_bos_token", False)))


def byte_level_tokenizer(model: models.Model, pre_tokenizer=None) -> RustTokenizer:
    """A BPE model wrapped GPT-2 style: byte-level pre-tokenizer (GPT-2 regex by default) and decoder."""
    tok = RustTokenizer(model)
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def from_gpt2_files(vocab_file: str | Path, merges_file: str | Path) -> HFTokenizer:
    """GPT-2's vocab.json + merges.txt (with or without the `#version` line); <|endoftext|> is bos and eos."""
    for f in (vocab_file, merges_file):
        if not Path(f).is_file():
            raise CheckpointError(f"{f}: not found (expected GPT-2 vocab.json + merges.txt)")
    try:
        bpe = models.BPE.from_file(str(vocab_file), str(merges_file))
    except Exception as err:
        raise CheckpointError(
            f"{vocab_file} / {merges_file}: not a GPT-2 vocab.json + merges.txt pair ({err})") from err
    tok = byte_level_tokenizer(bpe)
    tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    eot = tok.token_to_id(EOT)
    return HFTokenizer(tok, "gpt2", bos_id=eot, eos_id=eot)


def train_bpe(files: Sequence[str | Path], vocab_size: int, out_dir: str | Path | None = None,
              special_tokens: Sequence[str] = (EOT,), min_frequency: int = 2) -> HFTokenizer:
    """Train byte-level BPE on text files; the first special token is bos and eos (GPT-2 style).

    Saves tokenizer.json + sidecar into `out_dir` when given.
    """
    paths = [Path(f) for f in files]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: training text file not found")
    n_min = 256 + len(special_tokens)
    if vocab_size < n_min:
        raise DataError(f"vocab_size {vocab_size} is below the {n_min} byte and special tokens it must hold")
    tok = byte_level_tokenizer(models.BPE())
    specials = [AddedToken(t, special=True, normalized=False) for t in special_tokens]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(p) for p in paths], trainer)
    eot = tok.token_to_id(special_tokens[0]) if special_tokens else None
    result = HFTokenizer(tok, "bpe", bos_id=eot, eos_id=eot)
    if out_dir is not None:
        result.save(out_dir)
    return result
