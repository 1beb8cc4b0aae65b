"""A character-level tokenizer: one id per distinct character of a corpus (nanoGPT's shakespeare_char).

The vocabulary is the sorted set of characters, so the same corpus always gives the same ids
(65 for tinyshakespeare). It has no special tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from lmlab.errors import CheckpointError, DataError
from lmlab.fileio import read_text
from lmlab.tokenization.base import Tokenizer, atomic_write

CHAR_FILE = "char_vocab.json"


class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, chars: Sequence[str]):
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise DataError("a character vocabulary must list distinct single characters")
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @classmethod
    def from_files(cls, files: Sequence[str | Path]) -> CharTokenizer:
        chars: set[str] = set()
        for f in files:
            chars.update(read_text(f, "training text file"))
        if not chars:
            raise DataError(f"{', '.join(map(str, files))}: no text to build a character vocabulary from")
        return cls(sorted(chars))

    @classmethod
    def from_file(cls, path: str | Path) -> CharTokenizer:
        path = Path(path)
        try:
            chars = json.loads(path.read_text(encoding="utf-8"))["chars"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(
                f"{path}: not a character vocabulary (expected JSON {{\"chars\": [...]}}): {err}") from err
        return cls(chars)

    def _encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as err:
            raise DataError(f"character {err.args[0]!r} is not in the {self.vocab_size}-character vocabulary") from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def id_to_token(self, token_id: int) -> str:
        return self.chars[token_id]

    def token_to_id(self, token: str) -> int | None:
        return self.stoi.get(token)

    def _save_files(self, directory: Path) -> None:
        atomic_write(directory / CHAR_FILE, json.dumps({"kind": self.kind, "chars": self.chars}, ensure_ascii=False))
