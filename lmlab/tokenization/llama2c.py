"""llama2.c's `tokenizer.bin`: the Llama SentencePiece vocabulary as (score, bytes) records.

File layout (karpathy/llama2.c `tokenizer.py` export, read by `run.c`): int32 max_token_length,
then per token float32 score, int32 byte length, the raw bytes ("▁" already turned into " ").
Encoding and decoding follow run.c's `encode` and `decode` exactly: a dummy-prefix " " token, one
token per UTF-8 character with `<0xXX>` byte fallback (id = byte + 3), then repeatedly merge the
adjacent pair whose merged string has the highest score (leftmost on ties).
"""

from __future__ import annotations

import heapq
import struct
from collections.abc import Sequence
from pathlib import Path

from lmlab.errors import CheckpointError
from lmlab.tokenization.base import Tokenizer, atomic_write, decode_utf8

BIN_FILE = "tokenizer.bin"
BOS, EOS = 1, 2  # run.c hard-codes these (and <unk> = 0, bytes from 3)
_NO_MERGE = -1e10  # run.c's starting best_score: pairs scoring at or below it never merge


class Llama2cTokenizer(Tokenizer):
    """Pure-Python run.c tokenizer. decode() skips bos/eos and strips the space after BOS / at the start."""

    kind = "llama2c"

    def __init__(self, vocab: list[bytes], scores: list[float], max_token_length: int | None = None):
        self.vocab, self.scores = vocab, scores
        self.max_token_length = max_token_length or max(len(v) for v in vocab)
        self.vocab_size = len(vocab)
        self.bos_id, self.eos_id, self.pad_id = BOS, EOS, None
        self.add_bos = True
        self._lookup = {v: i for i, v in reversed(list(enumerate(vocab)))}  # first id wins on duplicates
        self._pieces = [_byte_value(v) for v in vocab]  # what each id prints: <0x0A> -> b"\n"

    @classmethod
    def from_file(cls, path: str | Path) -> Llama2cTokenizer:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: llama2.c tokenizer file not found (expected tokenizer.bin)")
        return cls(*read_tokenizer_bin(path))

    # ---- encode: run.c's encode()
    def _encode(self, text: str) -> list[int]:
        if not text:
            return []
        ids = [self._lookup[b" "]]  # add_dummy_prefix
        for ch in text:
            b = ch.encode("utf-8")
            i = self._lookup.get(b)
            if i is None:
                ids.extend(byte + 3 for byte in b)  # byte fallback
            else:
                ids.append(i)
        return self._merge(ids)

    def _merge(self, ids: list[int]) -> list[int]:
        """run.c's O(n^2) best-pair loop, as a heap over a linked list: same result, O(n log n).

        The heap orders by (-score, position); positions keep their order as pairs merge, so the
        smallest position among equal scores is run.c's leftmost pair.
        """
        n = len(ids)
        nxt = list(range(1, n)) + [-1]
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap: list[tuple[float, int, int, int, int]] = []

        def push(i: int) -> None:
            j = nxt[i]
            if i >= 0 and j >= 0:
                merged = self._lookup.get(self.vocab[ids[i]] + self.vocab[ids[j]])
                if merged is not None and self.scores[merged] > _NO_MERGE:
                    heapq.heappush(heap, (-self.scores[merged], i, ids[i], ids[j], merged))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, left, right, merged = heapq.heappop(heap)
            j = nxt[i]
            if not alive[i] or ids[i] != left or j < 0 or ids[j] != right:
                continue  # stale: one side has merged since this pair was pushed
            ids[i], alive[j] = merged, False
            nxt[i] = nxt[j]
            if nxt[j] >= 0:
                prv[nxt[j]] = i
            push(prv[i])
            push(i)
        return [t for t, keep in zip(ids, alive) if keep]

    # ---- decode: run.c's decode(prev_token, token), over a whole sequence
    def decode(self, ids: Sequence[int]) -> str:
        out = bytearray()
        prev = BOS  # a sequence starts as if after BOS, so decode(encode(text)) == text
        for t in ids:
            t = int(t)
            if t not in (BOS, EOS):
                piece = self._pieces[t]
                out += piece[1:] if prev == BOS and self.vocab[t][:1] == b" " else piece
            prev = t
        return decode_utf8(bytes(out))

    def id_to_token(self, token_id: int) -> str:
        piece = self.vocab[token_id]
        return decode_utf8(piece.strip() if token_id in (BOS, EOS) else piece)  # stored as "\n<s>\n"

    def token_to_id(self, token: str) -> int | None:
        return self._lookup.get(token.encode("utf-8"))

    def _save_files(self, directory: Path) -> None:
        atomic_write(directory / BIN_FILE, tokenizer_bin_bytes(self.vocab, self.scores, self.max_token_length))


def _byte_value(piece: bytes) -> bytes:
    """run.c: a piece spelled <0xXX> prints the raw byte XX."""
    if len(piece) == 6 and piece.startswith(b"<0x") and piece.endswith(b">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    return piece


def read_tokenizer_bin(path: Path) -> tuple[list[bytes], list[float], int]:
    """(vocab, scores, max_token_length); the vocab size is whatever the file holds."""
    data = path.read_bytes()
    expected = "llama2.c tokenizer.bin (int32 max_token_length, then float32 score + int32 length + bytes per token)"
    if len(data) < 4:
        raise CheckpointError(f"{path}: file of {len(data)} bytes is too short for a {expected}")
    (max_len,) = struct.unpack_from("<i", data, 0)
    vocab, scores, off = [], [], 4
    while off < len(data):
        if off + 8 > len(data):
            raise CheckpointError(f"{path}: truncated at byte {off} (token {len(vocab)}): expected a {expected}")
        score, n = struct.unpack_from("<fi", data, off)
        if n < 0 or n > max_len or off + 8 + n > len(data):
            raise CheckpointError(
                f"{path}: token {len(vocab)} at byte {off} has length {n} (max_token_length {max_len}, "
                f"file size {len(data)}): truncated or not a {expected}"
            )
        vocab.append(data[off + 8:off + 8 + n])
        scores.append(score)
        off += 8 + n
    if len(vocab) < 259:
        raise CheckpointError(
            f"{path}: only {len(vocab)} tokens; a {expected} has <unk>, <s>, </s> and 256 byte tokens")
    return vocab, scores, max_len


def tokenizer_bin_bytes(vocab: Sequence[bytes], scores: Sequence[float], max_token_length: int) -> bytes:
    parts = [struct.pack("<i", max_token_length)]
    parts += [struct.pack("<fi", s, len(v)) + v for v, s in zip(vocab, scores)]
    return b"".join(parts)


def from_sentencepiece_pieces(pieces: Sequence[tuple[str, float, int]]) -> Llama2cTokenizer:
    """llama2.c's export (tokenizer.py): <s>/</s> as "\\n<s>\\n", "▁" as " "."""
    vocab = []
    for i, (piece, _, _) in enumerate(pieces):
        text = {BOS: "\n<s>\n", EOS: "\n</s>\n"}.get(i, piece).replace("\u2581", " ")
        vocab.append(text.encode("utf-8"))
    return Llama2cTokenizer(vocab, [float(s) for _, s, _ in pieces])
