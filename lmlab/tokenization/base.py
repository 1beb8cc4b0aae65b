"""The one tokenizer interface every lmlab model, trainer and sampler talks to.

A `Tokenizer` turns text into ids and back, knows its special ids (bos/eos/pad and the end-of-turn
ids that stop generation), renders chat prompts with the model's own Jinja2 template, and saves
itself beside a checkpoint so that `load_tokenizer(checkpoint_dir)` gives the same tokenizer back.
`StreamDecoder` turns ids arriving one by one into printable text for a terminal.
"""

from __future__ import annotations

import codecs
import functools
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from lmlab.errors import ConfigError, DataError
from lmlab.fileio import atomic_write_bytes

SIDECAR = "lmlab_tokenizer.json"  # kind + special ids + chat template, written by every save()

# Tokens that end an assistant turn in common chat formats (ChatML, Llama 3, Phi-3, Gemma, GPT-2):
# generation must stop on them even when the model's eos is a different id.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def _bytewise_replace(err: UnicodeDecodeError) -> tuple[str, int]:
    """One U+FFFD per invalid byte, as SentencePiece does (Python's "replace" merges some runs)."""
    return "\ufffd" * (err.end - err.start), err.end


codecs.register_error("lmlab.bytewise_replace", _bytewise_replace)


def decode_utf8(data: bytes) -> str:
    """Bytes from byte-level tokens to text; invalid bytes become U+FFFD one for one."""
    return data.decode("utf-8", errors="lmlab.bytewise_replace")


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write a tokenizer file atomically (lmlab.fileio), text as UTF-8."""
    atomic_write_bytes(Path(path), data.encode("utf-8") if isinstance(data, str) else data)


class Tokenizer(ABC):
    """Text <-> ids. Subclasses set `kind`, `vocab_size` and the special ids in __init__."""

    kind: str = ""
    vocab_size: int
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    chat_template: str | None = None
    add_bos: bool = False  # whether the model was trained with BOS at the start of every sequence

    # ---- what each kind implements
    @abstractmethod
    def _encode(self, text: str) -> list[int]:
        """The ids of `text` alone: no BOS/EOS added."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; see each kind for how special ids are shown."""

    @abstractmethod
    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of one id, as the tokenizer spells it (e.g. 'Ġthe', '▁the')."""

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of a whole vocabulary entry, or None."""

    @abstractmethod
    def _save_files(self, directory: Path) -> None:
        """Write this kind's own file(s) into `directory`."""

    # ---- shared behaviour
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._encode(text)
        if bos:
            ids.insert(0, self._require("bos_id"))
        if eos:
            ids.append(self._require("eos_id"))
        return ids

    def _require(self, name: str) -> int:
        value = getattr(self, name)
        if value is None:
            raise ConfigError(f"{self.kind} tokenizer has no {name}: cannot add it to the sequence")
        return value

    @functools.cached_property
    def stop_ids(self) -> set[int]:
        """Ids that end generation: eos plus any end-of-turn token in the vocabulary."""
        ids = {self.eos_id} if self.eos_id is not None else set()
        ids.update(i for t in END_OF_TURN_TOKENS if (i := self.token_to_id(t)) is not None)
        return ids

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """Render `messages` ([{"role", "content"}, ...]) with the model's template, as transformers does."""
        if not self.chat_template:
            raise ConfigError(
                f"{self.kind} tokenizer has no chat_template: use a chat model's tokenizer, "
                f"or set chat_template in {SIDECAR}"
            )
        context = {"bos_token": self._token_text(self.bos_id), "eos_token": self._token_text(self.eos_id),
                   "pad_token": self._token_text(self.pad_id), **extra}
        try:
            return _compile_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **context
            )
        except DataError:
            raise
        except Exception as err:  # jinja2 errors: undefined fields, bad message shapes
            raise DataError(f"chat template failed on the given messages: {err}") from err

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self.id_to_token(token_id)

    def save(self, directory: str | Path) -> None:
        """Write this tokenizer into `directory` so that `load_tokenizer(directory)` rebuilds it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._save_files(directory)
        atomic_write(directory / SIDECAR, json.dumps(self.metadata(), indent=2, ensure_ascii=False) + "\n")

    def metadata(self) -> dict:
        """What the sidecar records: everything a kind's own file may not carry."""
        return {"kind": self.kind, "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "add_bos": self.add_bos, "chat_template": self.chat_template}

    def apply_metadata(self, meta: dict) -> None:
        """Restore special ids and the chat template from a sidecar (inverse of `metadata`)."""
        for key in ("bos_id", "eos_id", "pad_id", "add_bos", "chat_template"):
            if key in meta:
                setattr(self, key, meta[key])
        self.__dict__.pop("stop_ids", None)  # recompute with the restored eos

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} kind={self.kind} vocab_size={self.vocab_size} "
                f"bos={self.bos_id} eos={self.eos_id}>")


def _raise_exception(message: str) -> None:
    raise DataError(f"chat template: {message}")


@functools.lru_cache(maxsize=16)
def _compile_template(template: str):
    """Compile once per template, in a sandbox: templates come from downloaded files."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def tojson(value, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class StreamDecoder:
    """Incremental detokenization: `put(id)` returns the new text, `flush()` the rest.

    Decoding one id at a time is wrong twice over: a character may be split across byte tokens,
    and SentencePiece drops the leading space of the *first* piece only. So we decode a short window
    `ids[prefix:]` and emit what it adds over `ids[prefix:read]` (the text already shown); both
    start at the same id, so any start-of-text rule applies to both alike. Text that ends in an
    incomplete character (U+FFFD) is held back until the next id completes it.
    `context` (e.g. the prompt's last id) counts as already shown, so a continuation keeps the leading
    space that decoding it alone would drop.
    Invariant: "".join(all puts) + flush() == decode_continuation(tokenizer, context, ids not in skip_ids).
    """

    def __init__(self, tokenizer: Tokenizer, skip_ids: frozenset[int] | set[int] = frozenset(),
                 context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.skip_ids = skip_ids  # e.g. tokenizer.stop_ids: never shown
        self.ids: list[int] = [int(i) for i in context]
        self._prefix = 0  # window start: a little context already shown
        self._read = len(self.ids)  # ids up to here have been shown

    def put(self, token_id: int) -> str:
        if token_id in self.skip_ids:
            return ""
        self.ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """The held-back tail (an incomplete character decodes to U+FFFD here, as in decode())."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        shown = self.tokenizer.decode(self.ids[self._prefix:self._read])
        text = self.tokenizer.decode(self.ids[self._prefix:])
        if not final and text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(shown):]


def decode_continuation(tokenizer: Tokenizer, context: Sequence[int], new: Sequence[int]) -> str:
    """The text `new` adds after `context` (e.g. the prompt's last id). SentencePiece and llama2.c drop the
    leading space of a text's first piece, so a continuation decoded alone ("Once upon a" -> "time") loses
    the space it has after its prompt (" time")."""
    head = tokenizer.decode(list(context))
    full = tokenizer.decode([*context, *new])
    return full[len(head):] if full.startswith(head) else tokenizer.decode(list(new))
