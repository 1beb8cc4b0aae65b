"""Preference data for DPO and reward models: JSONL pairs -> (prompt, chosen, rejected) -> token ids -> batches.

Two input formats (one JSON object per line):
- TRL's preference format (huggingface/trl `docs/source/dataset_formats.md`): `prompt`, `chosen`, `rejected`,
  each a string ("standard") or a list of chat messages ("conversational"); without `prompt`, two message
  lists whose common leading messages are the prompt ("implicit prompt"). An optional number `margin`
  rides along (the reward model's Bradley-Terry margin).
- Anthropic HH-RLHF (Bai et al. 2022): `chosen` and `rejected` are whole dialogues "\\n\\nHuman: ...
  \\n\\nAssistant: ..." that share everything up to the last "\\n\\nAssistant:"; that shared part is the prompt,
  parsed into chat messages, and each final assistant turn is a response. A pair whose two dialogues
  differ before that point (5 of the 2,312 harmless-base test pairs) has no single prompt: it is skipped
  and counted, never guessed.

Bad input is one DataError naming the file and line: not UTF-8, not JSON, a missing or mistyped field, an
empty prompt, identical chosen and rejected, a pair with no completion token left after truncation (TRL
PR #3398: such a row gives a NaN mean). Nothing is silently dropped.

Tokens: prompt and responses are tokenized separately and concatenated, so the boundary is exact. With a
chat template, the prompt ends on the assistant's generation prompt and each response on the template's
end-of-turn text (SmolLM2: `<|im_end|>`, which is also its EOS and pad token: masks come from lengths,
never from token ids, so that closing EOS counts, TRL PR #3091); plain-text pairs get the tokenizer's EOS
appended, as TRL does. Truncation keeps the end of the prompt (its question and the generation prompt)
and the start of each response.

Batches put the B chosen rows first and the B rejected rows after them in one right-padded (2B, T)
tensor, so one forward pass scores both (TRL's concatenated forward); `prompt_lens` and `lengths` say
which positions are completion tokens. The batch source is a pure function of (step, micro), so resume
is exact.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmlab.data.batch import Batch, right_pad
from lmlab.data.instruct import InstructBatches, split_records
from lmlab.errors import ConfigError, DataError
from lmlab.fileio import atomic_write_text, read_text

Message = dict[str, str]
Text = str | list[Message]  # a string, or chat messages [{"role", "content"}, ...]
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
SPLITS = ("train", "val", "test")


@dataclass
class Pair:
    """One preference: the prompt and two responses to it, the first preferred. `where` is file:line."""

    prompt: Text
    chosen: Text
    rejected: Text
    where: str = ""
    margin: float | None = None

    def to_json(self) -> dict[str, Any]:
        """TRL's preference format (what pairs/{train,val,test}.jsonl hold), with the source line."""
        out: dict[str, Any] = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
        if self.margin is not None:
            out["margin"] = self.margin
        return {**out, "source": self.where}


@dataclass
class PairFile:
    """The pairs of one or more files and what was skipped (reason -> count, with the first lines)."""

    pairs: list[Pair] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    skipped_where: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------
# reading


def read_pairs(paths: list[str | Path], fmt: str = "auto") -> PairFile:
    """Every file's pairs, in file and line order. fmt: auto (per line), trl or hh."""
    if fmt not in ("auto", "trl", "hh"):
        raise ConfigError(f"data.format={fmt!r}: expected auto, trl or hh")
    out = PairFile()
    for path in paths:
        lines = 0
        for lineno, row in read_json_lines(Path(path)):
            lines += 1
            where = f"{path}:{lineno}"
            pair = parse_pair(row, where, fmt)
            if isinstance(pair, str):
                out.skipped[pair] += 1
                out.skipped_where.append(where)
            else:
                out.pairs.append(pair)
        if not lines:
            raise DataError(f"{path}: no preference pairs (the file is empty or blank); expected JSONL lines "
                            "with prompt/chosen/rejected or HH-RLHF chosen/rejected dialogues")
    return out


def read_json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) of each non-blank line; a missing file, bad bytes or bad JSON name the
    file (and line): lmlab.fileio.read_text."""
    text = read_text(path, "preference data file (JSONL)")
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})") from None


def parse_pair(row: Any, where: str, fmt: str = "auto") -> Pair | str:
    """A checked Pair, or the reason a well-formed line is skipped ("prompt_mismatch"); else a DataError."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with prompt/chosen/rejected, got {type(row).__name__}")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise DataError(f"{where}: missing field {key!r} (has {sorted(row)})")
    margin = row.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise DataError(f"{where}: field 'margin' must be a number, got {type(margin).__name__}")
    is_hh = "prompt" not in row and isinstance(row["chosen"], str) and ASSISTANT in row["chosen"]
    if fmt == "hh" or (fmt == "auto" and is_hh):
        parsed = _hh_pair(row, where)
        if isinstance(parsed, str):
            return parsed
        prompt, chosen, rejected = parsed
    else:
        chosen, rejected = (_text(row[k], where, k) for k in ("chosen", "rejected"))
        if "prompt" in row:
            prompt = _text(row["prompt"], where, "prompt")
        elif isinstance(chosen, list) and isinstance(rejected, list):
            prompt, chosen, rejected = _split_implicit(chosen, rejected)
        else:
            raise DataError(f"{where}: missing field 'prompt' (has {sorted(row)}); expected TRL's preference format "
                            "or HH-RLHF dialogues with \\n\\nHuman: / \\n\\nAssistant: turns")
        if isinstance(prompt, list) != isinstance(chosen, list) or isinstance(chosen, list) != isinstance(rejected, list):
            raise DataError(f"{where}: prompt, chosen and rejected must all be strings or all message lists")
    if not _content(prompt).strip():
        raise DataError(f"{where}: empty prompt")
    if chosen == rejected:
        raise DataError(f"{where}: chosen and rejected are identical (the pair prefers nothing)")
    return Pair(prompt, chosen, rejected, where, None if margin is None else float(margin))


def _text(value: Any, where: str, key: str) -> Text:
    """A string, or a list of {"role", "content"} messages with string contents."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        for i, m in enumerate(value):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: {key}[{i}] must have string 'role' and 'content' (got {sorted(m)})")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(f"{where}: field {key!r} must be a string or a list of chat messages, got {type(value).__name__}")


def _content(text: Text) -> str:
    return text if isinstance(text, str) else "".join(m["content"] for m in text)


def _split_implicit(chosen: list[Message], rejected: list[Message]) -> tuple[Text, Text, Text]:
    """TRL's implicit prompt: the messages both conversations start with."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def _hh_pair(row: dict[str, Any], where: str) -> tuple[list[Message], list[Message], list[Message]] | str:
    """HH-RLHF dialogues -> (prompt messages, [chosen turn], [rejected turn]), or "prompt_mismatch"."""
    parts = []
    for key in ("chosen", "rejected"):
        text = row[key]
        if not isinstance(text, str):
            raise DataError(f"{where}: field {key!r} must be an HH-RLHF dialogue string, got {type(text).__name__}")
        cut = text.rfind(ASSISTANT)
        if cut < 0:
            raise DataError(f"{where}: {key} has no '\\n\\nAssistant:' turn (not an HH-RLHF dialogue)")
        parts.append((text[:cut], text[cut + len(ASSISTANT):].strip()))
    (prompt_c, chosen), (prompt_r, rejected) = parts
    if prompt_c != prompt_r:
        return "prompt_mismatch"
    prompt = hh_messages(prompt_c)
    if not prompt:
        raise DataError(f"{where}: empty prompt")
    return prompt, [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]


def hh_messages(dialogue: str) -> list[Message]:
    """"\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c" -> user a, assistant b, user c (text before the first
    turn marker is dropped; empty turns are kept, as the data has them)."""
    messages: list[Message] = []
    i = min((j for j in (dialogue.find(HUMAN), dialogue.find(ASSISTANT)) if j >= 0), default=-1)
    while i >= 0:
        role, marker = ("user", HUMAN) if dialogue.startswith(HUMAN, i) else ("assistant", ASSISTANT)
        start = i + len(marker)
        nxt = [j for j in (dialogue.find(HUMAN, start), dialogue.find(ASSISTANT, start)) if j >= 0]
        i = min(nxt, default=-1)
        messages.append({"role": role, "content": dialogue[start: i if i >= 0 else len(dialogue)].strip()})
    return messages if any(m["content"] for m in messages) else []


def split_pairs(pairs: list[Pair], ratios: tuple[int, ...], seed: int) -> dict[str, list[Pair]]:
    """The seeded train/val/test split (the same shuffle-and-cut as SFT's records)."""
    return dict(zip(SPLITS, split_records(pairs, ratios, seed)))


def write_pairs(pairs: list[Pair], path: Path) -> Path:
    """TRL-format JSONL (conversational pairs as message lists), so any tool can re-score the split."""
    atomic_write_text(path, "".join(json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in pairs))
    return path


# ----------------------------------------------------------------------------------------------------
# tokens


@dataclass
class PreferenceFormat:
    """How a pair becomes token ids: the chat template (conversational pairs) or plain text + EOS, and the
    truncation budget (max_len per sequence; the prompt cut to its last max_prompt_len tokens first)."""

    tokenizer: Any
    template: str = "auto"
    system: str = ""
    max_len: int = 512
    max_prompt_len: int = 256

    def __post_init__(self) -> None:
        if self.template not in ("auto", "chat", "plain"):
            raise ConfigError(f"data.template={self.template!r}: expected auto, chat or plain")
        if self.max_prompt_len and self.max_prompt_len >= self.max_len:
            raise ConfigError(f"data.max_prompt_len={self.max_prompt_len} must be below data.max_len={self.max_len} "
                              "(or 0 for no separate prompt budget), so every response keeps a token")
        if self.template == "chat" and not self.tokenizer.chat_template:
            raise ConfigError("data.template=chat: this tokenizer has no chat template; use template=plain")
        self.bos = bool(self.tokenizer.add_bos and self.tokenizer.bos_id is not None)

    def uses_chat(self, prompt: Text) -> bool:
        return isinstance(prompt, list) and self.template != "plain" and bool(self.tokenizer.chat_template)

    def prompt_text(self, prompt: Text) -> str:
        """The text the model continues: the rendered chat prompt, HH-style turns, or the plain prompt."""
        if self.uses_chat(prompt):
            return self.tokenizer.apply_chat_template(self._with_system(prompt), add_generation_prompt=True)
        if isinstance(prompt, list):
            return _hh_text(prompt) + ASSISTANT
        return prompt

    def response_text(self, prompt: Text, response: Text) -> str:
        """A response as the text that follows prompt_text (chat: through the end-of-turn marker)."""
        if self.uses_chat(prompt):
            before = self.prompt_text(prompt)
            full = self.tokenizer.apply_chat_template(self._with_system(prompt) + list(response),
                                                      add_generation_prompt=False)
            if not full.startswith(before):
                raise ConfigError("this chat template renders a conversation's start differently from its generation "
                                  "prompt, so responses cannot be located; use data.template=plain")
            return full[len(before):].rstrip("\n")
        if isinstance(response, list):
            return " " + _hh_text(response).removeprefix(ASSISTANT).strip()
        return response

    def _with_system(self, messages: list[Message]) -> list[Message]:
        if self.system and not (messages and messages[0]["role"] == "system"):
            return [{"role": "system", "content": self.system}] + messages
        return messages

    def encode_prompt(self, prompt: Text) -> list[int]:
        return self.tokenizer.encode(self.prompt_text(prompt), bos=self.bos)

    def encode_response(self, prompt: Text, response: Text) -> list[int]:
        ids = self.tokenizer.encode(self.response_text(prompt, response))
        if not self.uses_chat(prompt) and self.tokenizer.eos_id is not None:
            ids.append(self.tokenizer.eos_id)
        return ids

    def fit(self, prompt: list[int], responses: list[list[int]], where: str) -> tuple[list[int], list[list[int]], bool, bool]:
        """Truncate: the prompt keeps its end (at most max_prompt_len tokens, BOS kept), the responses their
        start (what fits in max_len after the prompt). Returns (prompt, responses, prompt cut, a response
        cut); no response token left is a DataError naming `where`."""
        prompt_cut = bool(self.max_prompt_len) and len(prompt) > self.max_prompt_len
        if prompt_cut:
            keep = self.max_prompt_len - self.bos
            prompt = prompt[:self.bos] + prompt[len(prompt) - keep:]
        room = self.max_len - len(prompt)
        if room <= 0:
            raise DataError(f"{where}: no completion token left: the prompt is {len(prompt)} tokens and "
                            f"data.max_len={self.max_len}; raise data.max_len or set data.max_prompt_len")
        response_cut = any(len(r) > room for r in responses)
        return prompt, [r[:room] for r in responses], prompt_cut, response_cut


def _hh_text(messages: list[Message]) -> str:
    """Messages in HH-RLHF's own text form, for a model without a chat template."""
    return "".join(f"{HUMAN if m['role'] == 'user' else ASSISTANT} {m['content']}" for m in messages
                   if m["role"] in ("user", "assistant"))


@dataclass
class EncodedPair:
    """Token ids of one pair; every sequence is prompt + response."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    where: str = ""
    margin: float = 0.0

    @property
    def length(self) -> int:
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


@dataclass
class PreferenceData:
    """Encoded pairs plus what was cut or dropped, and why."""

    pairs: list[EncodedPair]
    truncated_prompts: int = 0
    truncated_responses: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        return {"pairs": len(self.pairs), "truncated_prompts": self.truncated_prompts,
                "truncated_responses": self.truncated_responses, "skipped": dict(self.skipped),
                "tokens": sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in self.pairs)}


def encode_pairs(pairs: list[Pair], fmt: PreferenceFormat) -> PreferenceData:
    """Tokenize and truncate (PreferenceFormat.fit). A pair whose two responses become identical after the
    cut carries no preference: skipped, counted."""
    data = PreferenceData([])
    for pair in pairs:
        prompt, (chosen, rejected), prompt_cut, response_cut = fmt.fit(
            fmt.encode_prompt(pair.prompt),
            [fmt.encode_response(pair.prompt, pair.chosen), fmt.encode_response(pair.prompt, pair.rejected)],
            pair.where)
        data.truncated_prompts += prompt_cut
        data.truncated_responses += response_cut
        if chosen == rejected:
            data.skipped["identical_after_truncation"] += 1
            continue
        data.pairs.append(EncodedPair(prompt, chosen, rejected, pair.where, pair.margin or 0.0))
    return data


def encode_completion(prompt: Text, response: Text, fmt: PreferenceFormat, where: str = "") -> tuple[list[int], int]:
    """One scored sequence (prompt + response ids, truncated as pairs are) and its prompt length."""
    ids, (response_ids,), _, _ = fmt.fit(fmt.encode_prompt(prompt), [fmt.encode_response(prompt, response)], where)
    return ids + response_ids, len(ids)


def read_completions(path: str | Path) -> list[tuple[Text, Text, str]]:
    """TRL's prompt-completion JSONL (`prompt`, `completion`): (prompt, completion, file:line) per line."""
    out = []
    for lineno, row in read_json_lines(Path(path)):
        where = f"{path}:{lineno}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with prompt/completion, got {type(row).__name__}")
        for key in ("prompt", "completion"):
            if key not in row:
                raise DataError(f"{where}: missing field {key!r} (has {sorted(row)})")
        prompt, completion = _text(row["prompt"], where, "prompt"), _text(row["completion"], where, "completion")
        if isinstance(prompt, list) != isinstance(completion, list):
            raise DataError(f"{where}: prompt and completion must both be strings or both message lists")
        out.append((prompt, completion, where))
    return out


# ----------------------------------------------------------------------------------------------------
# batches


def collate_pairs(pairs: list[EncodedPair], pad_id: int, ref_logps: torch.Tensor | None = None) -> Batch:
    """(2B, T) right-padded rows, chosen first: input_ids, prompt_lens, lengths, margin (B,), and the
    reference log-probs (2B,) when they were precomputed (ref_logps: (B, 2) chosen, rejected)."""
    rows = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    ids, _ = right_pad(rows, pad_id)
    batch = {"input_ids": ids, "prompt_lens": torch.tensor([len(p.prompt) for p in pairs] * 2),
             "lengths": torch.tensor([len(r) for r in rows]),
             "margin": torch.tensor([p.margin for p in pairs], dtype=torch.float32)}
    if ref_logps is not None:
        batch["ref_logps"] = torch.cat([ref_logps[:, 0], ref_logps[:, 1]]).float()
    return batch


class PairBatches(InstructBatches):
    """The training batch source: SFT's seeded epoch order and length-sorted steps, over pairs
    (`batch_size` pairs = 2 x batch_size sequences per micro-batch)."""

    def __init__(self, data: PreferenceData, batch_size: int, grad_accum: int, seed: int, pad_id: int,
                 ref_logps: torch.Tensor | None = None) -> None:
        if not data.pairs:
            raise DataError("no training pairs left: check data.paths and the split")
        self.batch_size, self.grad_accum, self.seed, self.pad_id = batch_size, grad_accum, seed, pad_id
        self.items: list[Any] = list(range(len(data.pairs)))  # indices, so precomputed rows follow them
        self.pairs, self.ref_logps = data.pairs, ref_logps
        self._perm = None

    def item_length(self, item: int) -> int:
        return self.pairs[item].length

    def __call__(self, step: int, micro: int = 0) -> Batch:
        idx = self.step_items(step)[micro * self.batch_size: (micro + 1) * self.batch_size]
        ref = self.ref_logps[idx] if self.ref_logps is not None else None
        return collate_pairs([self.pairs[i] for i in idx], self.pad_id, ref)


def pair_batches(pairs: list[EncodedPair], batch_size: int, pad_id: int,
                 ref_logps: torch.Tensor | None = None) -> tuple[list[Batch], list[list[int]]]:
    """Fixed evaluation batches, sorted by length (little padding), and the pair indices of each."""
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].length)
    groups = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    batches = [collate_pairs([pairs[i] for i in g], pad_id, ref_logps[g] if ref_logps is not None else None)
               for g in groups]
    return batches, groups
