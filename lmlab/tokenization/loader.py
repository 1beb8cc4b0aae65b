"""`load_tokenizer(path)`: any tokenizer file or folder lmlab knows, by its contents.

A folder written by `Tokenizer.save()` carries `lmlab_tokenizer.json` (kind, special ids, chat
template), which is read first; otherwise the files present decide.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmlab.errors import CheckpointError, ConfigError, DataError
from lmlab.fileio import check_output_dir, read_text, write_output_dir
from lmlab.tokenization.base import SIDECAR, Tokenizer
from lmlab.tokenization.char import CHAR_FILE, CharTokenizer
from lmlab.tokenization.gguf_vocab import tokenizer_from_gguf
from lmlab.tokenization.hf import JSON_FILE, from_gpt2_files, from_tokenizer_json, train_bpe
from lmlab.tokenization.llama2c import BIN_FILE, Llama2cTokenizer
from lmlab.tokenization.spm import MODEL_FILE, SentencePieceTokenizer

EXPECTED = ("a tokenizer.json, a SentencePiece .model, a llama2.c tokenizer.bin, a .gguf, "
            "GPT-2 vocab.json + merges.txt, or a char_vocab.json")

# kind -> the file save() writes for it
_KIND_FILES = {"sentencepiece": MODEL_FILE, "llama2c": BIN_FILE, "char": CHAR_FILE,
               **dict.fromkeys(("hf", "gpt2", "bpe", "gguf"), JSON_FILE)}


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such tokenizer file or folder (expected {EXPECTED})")
    return _load_dir(path) if path.is_dir() else _load_file(path)


def _load_dir(folder: Path) -> Tokenizer:
    if (folder / SIDECAR).is_file():
        return _load_saved(folder)
    for name in (JSON_FILE, MODEL_FILE, BIN_FILE, CHAR_FILE):
        if (folder / name).is_file():
            return _load_file(folder / name)
    vocabs, ggufs = sorted(folder.glob("*vocab.json")), sorted(folder.glob("*.gguf"))
    if vocabs:
        return _load_file(vocabs[0])
    if len(ggufs) == 1:
        return _load_file(ggufs[0])
    raise CheckpointError(f"{folder}: no tokenizer found in this folder (expected {EXPECTED})")


def _load_saved(folder: Path) -> Tokenizer:
    try:
        meta = json.loads((folder / SIDECAR).read_text(encoding="utf-8"))
        kind = meta["kind"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{folder / SIDECAR}: unreadable (expected JSON with a 'kind' key): {err}") from err
    if kind not in _KIND_FILES:
        raise CheckpointError(f"{folder / SIDECAR}: unknown kind {kind!r} (expected one of {sorted(_KIND_FILES)})")
    tok = _load_file(folder / _KIND_FILES[kind])
    tok.kind = kind
    tok.apply_metadata(meta)
    return tok


def _load_file(file: Path) -> Tokenizer:
    if not file.is_file():
        raise CheckpointError(f"{file}: not found (expected {EXPECTED})")
    suffix = file.suffix.lower()
    if suffix == ".model":
        return SentencePieceTokenizer.from_file(file)
    if suffix == ".bin":
        return Llama2cTokenizer.from_file(file)
    if suffix == ".gguf":
        return tokenizer_from_gguf(file)
    if suffix == ".json":
        return _load_json(file)
    if file.name.endswith("merges.txt"):
        return from_gpt2_files(_sibling(file, "merges.txt", "vocab.json"), file)
    raise CheckpointError(f"{file}: unknown tokenizer format (expected {EXPECTED})")


def _load_json(file: Path) -> Tokenizer:
    try:
        head = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{file}: not valid JSON ({err}); expected {EXPECTED}") from err
    if isinstance(head, dict) and isinstance(head.get("model"), dict):
        return from_tokenizer_json(file)
    if isinstance(head, dict) and isinstance(head.get("chars"), list):
        return CharTokenizer.from_file(file)
    if isinstance(head, dict) and file.name.endswith("vocab.json"):
        return from_gpt2_files(file, _sibling(file, "vocab.json", "merges.txt"))
    raise CheckpointError(f"{file}: JSON of unknown tokenizer format (expected {EXPECTED})")


def _sibling(file: Path, suffix: str, other: str) -> Path:
    """gpt2_vocab.json -> gpt2_merges.txt, vocab.json -> merges.txt."""
    return file.with_name(file.name[: -len(suffix)] + other)


TOKENIZER_KIND = "tokenizer"


def train_tokenizer(files: list[Path], out_dir: Path, kind: str = "bpe", vocab_size: int = 4096, *,
                    force: bool = False) -> Tokenizer:
    """Train a "bpe" (byte-level BPE) or "char" tokenizer on UTF-8 text files and save it into `out_dir`
    (new, empty or an earlier tokenizer export; `force` writes beside other files: lmlab.fileio)."""
    if kind not in ("bpe", "char"):
        raise ConfigError(f"tokenizer kind {kind!r} cannot be trained (expected 'bpe' or 'char')")
    check_output_dir(out_dir, TOKENIZER_KIND, force=force, legacy=lambda f: (f / SIDECAR).is_file())
    if not any(read_text(f, "training text file").strip() for f in files):  # also: every file is UTF-8
        raise DataError(f"{', '.join(map(str, files))}: no text to train a tokenizer on (the files are empty)")
    tok = train_bpe(files, vocab_size) if kind == "bpe" else CharTokenizer.from_files(files)
    write_output_dir(tok.save, out_dir, TOKENIZER_KIND, force=force, legacy=lambda f: (f / SIDECAR).is_file())
    return tok
