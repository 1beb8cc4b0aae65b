"""SentencePiece tokenizers (Llama 2, TinyStories' tok512), through the `sentencepiece` library.

Also builds a SentencePiece model from a bare vocabulary (pieces, scores, types), which is how a
GGUF file with `tokenizer.ggml.model == "llama"` stores its tokenizer. The ModelProto is written by
hand (a dozen protobuf fields), so no `protobuf` dependency is needed.
Kudo & Richardson 2018, "SentencePiece" (arXiv:1808.06226).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import sentencepiece as spm

from lmlab.errors import CheckpointError
from lmlab.tokenization.base import Tokenizer, atomic_write

MODEL_FILE = "tokenizer.model"

# SentencePiece piece types (sentencepiece_model.proto); GGUF's token_type uses the same numbers.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class SentencePieceTokenizer(Tokenizer):
    """A `.model` file. decode() drops control ids (bos/eos) and strips the dummy-prefix space.

    With `special_in_text` (vocabularies read from GGUF, where llama.cpp's rules are the reference), control
    and user-defined pieces written in the text (Gemma's `<start_of_turn>`, `<bos>`, runs of spaces) encode
    as their own id, as Hugging Face's added tokens and llama.cpp's parse_special do; a `.model` file keeps
    the sentencepiece library's behaviour; the sentencepiece library
    itself never matches control pieces, which would split a chat template's markers into characters."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, source: str = "<memory>", special_in_text: bool = False):
        self.model_proto = model_proto
        self.special_in_text = special_in_text
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception as err:  # sentencepiece raises RuntimeError/OSError on a bad proto
            raise CheckpointError(f"{source}: not a SentencePiece model ({err})") from err
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id, self.pad_id = (_id_or_none(i) for i in
                                                 (self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()))
        self.add_bos = True  # Llama-style models always start with <s>

    @classmethod
    def from_file(cls, path: str | Path) -> SentencePieceTokenizer:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: SentencePiece model file not found (expected a tokenizer .model)")
        return cls(path.read_bytes(), source=str(path))

    @cached_property
    def _control_pattern(self) -> re.Pattern | None:
        """Every control and user-defined piece as a literal, longest first (built on first use: one pass
        over the vocabulary). User-defined pieces are matched in the raw text, as Hugging Face and
        llama.cpp match them: Gemma's runs of spaces ('  ') are user-defined pieces written with plain
        spaces, which sentencepiece, seeing the text after spaces became '▁', would never match."""
        kinds = (CONTROL, USER_DEFINED)
        pieces = sorted({piece for piece, _, kind in self.proto_pieces()[0] if kind in kinds} - {""}, key=len,
                        reverse=True)
        return re.compile("|".join(map(re.escape, pieces))) if pieces else None

    def _encode(self, text: str) -> list[int]:
        pattern = self._control_pattern if self.special_in_text else None
        if pattern is None:
            return self.sp.encode(text)
        ids, start = [], 0
        for m in pattern.finditer(text):
            if m.start() > start:
                ids += self.sp.encode(text[start:m.start()])
            ids.append(self.sp.piece_to_id(m.group()))
            start = m.end()
        if start < len(text) or not ids:
            ids += self.sp.encode(text[start:])
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_token(self, token_id: int) -> str:
        return self.sp.id_to_piece(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        if i < 0:  # unknown, and the vocabulary has no <unk> piece (Gemma's <unk> is a control piece)
            return None
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def _save_files(self, directory: Path) -> None:
        atomic_write(directory / MODEL_FILE, self.model_proto)

    def pieces(self) -> list[tuple[str, float, int]]:
        """(piece, score, type) per id: the vocabulary as llama2.c and GGUF export it."""
        sp = self.sp
        return [(sp.id_to_piece(i), sp.get_score(i), _piece_type(sp, i)) for i in range(self.vocab_size)]

    def proto_pieces(self) -> tuple[list[tuple[str, float, int]], dict[str, int | bool]]:
        """The pieces as the ModelProto stores them, user-defined types included (which the
        sentencepiece API does not report), and its unk_id and add_dummy_prefix settings."""
        return read_proto_pieces(self.model_proto)


def _id_or_none(i: int) -> int | None:
    return None if i < 0 else i


def _piece_type(sp: spm.SentencePieceProcessor, i: int) -> int:
    for check, kind in ((sp.is_unknown, UNKNOWN), (sp.is_control, CONTROL), (sp.is_byte, BYTE),
                        (sp.is_unused, UNUSED)):
        if check(i):
            return kind
    return NORMAL


# ---- a minimal protobuf writer for sentencepiece_model.proto's ModelProto


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 (pad_id=-1) is a 10-byte two's-complement varint
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _int_field(num: int, value: int) -> bytes:
    return _varint(num << 3) + _varint(value)


def _bytes_field(num: int, value: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(value)) + value


def _read_varint(buf: bytes, off: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = buf[off]
        off += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, off


def _proto_fields(buf: bytes):
    """(field number, wire type, value) of one protobuf message; value is bytes for length-delimited
    fields and an int (varint) or raw 4/8 bytes otherwise."""
    off = 0
    while off < len(buf):
        key, off = _read_varint(buf, off)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, off = _read_varint(buf, off)
        elif wire == 2:
            n, off = _read_varint(buf, off)
            value, off = buf[off:off + n], off + n
        else:
            size = 4 if wire == 5 else 8
            value, off = buf[off:off + size], off + size
        yield num, wire, value


def read_proto_pieces(model_proto: bytes) -> tuple[list[tuple[str, float, int]], dict[str, int | bool]]:
    """((piece, score, type) per id, {unk_id, add_dummy_prefix}) from a serialized ModelProto."""
    pieces, settings = [], {"unk_id": 0, "add_dummy_prefix": True}  # the proto's defaults
    for num, _, value in _proto_fields(model_proto):
        if num == 1:  # SentencePiece {piece = 1, score = 2, type = 3 (default NORMAL)}
            piece, score, kind = "", 0.0, NORMAL
            for f, _, v in _proto_fields(value):
                if f == 1:
                    piece = v.decode("utf-8")
                elif f == 2:
                    score = struct.unpack("<f", v)[0]
                elif f == 3:
                    kind = v
            pieces.append((piece, score, kind))
        elif num == 2:  # TrainerSpec {unk_id = 40}
            settings["unk_id"] = next((v for f, _, v in _proto_fields(value) if f == 40), 0)
        elif num == 3:  # NormalizerSpec {add_dummy_prefix = 3}
            settings["add_dummy_prefix"] = next((bool(v) for f, _, v in _proto_fields(value) if f == 3), True)
    return pieces, settings


def sentencepiece_proto(
    pieces: Sequence[tuple[str, float, int]], *, unk_id: int = 0, bos_id: int = 1, eos_id: int = 2,
    pad_id: int = -1, add_dummy_prefix: bool = True, precompiled_charsmap: bytes | None = None,
) -> bytes:
    """A serialized BPE ModelProto: pieces (field 1), trainer_spec (2), normalizer_spec (3)."""
    byte_fallback = any(kind == BYTE for _, _, kind in pieces)
    out = bytearray()
    for piece, score, kind in pieces:
        body = _bytes_field(1, piece.encode("utf-8")) + b"\x15" + struct.pack("<f", score) + _int_field(3, kind)
        out += _bytes_field(1, body)  # b"\x15" = field 2, wire type 5 (float32)
    trainer = (_int_field(3, 2) + _int_field(4, len(pieces)) + _int_field(35, byte_fallback)  # model_type=BPE
               + _int_field(40, unk_id) + _int_field(41, bos_id) + _int_field(42, eos_id) + _int_field(43, pad_id))
    normalizer = _bytes_field(1, b"nmt_nfkc" if precompiled_charsmap else b"identity")
    if precompiled_charsmap:
        normalizer += _bytes_field(2, precompiled_charsmap)
    normalizer += _int_field(3, add_dummy_prefix) + _int_field(4, 0) + _int_field(5, 1)  # keep spaces, escape them
    out += _bytes_field(2, trainer) + _bytes_field(3, normalizer)
    return bytes(out)
