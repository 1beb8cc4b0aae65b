"""Instruction data for supervised fine-tuning: records -> prompt/response text -> token ids -> batches.

A record is `{"instruction", "input", "output"}` (Alpaca, Taori et al. 2023). A template turns it into a
prompt and a response; only the response tokens are trained on (the prompt's labels are IGNORE_INDEX),
so the model learns to answer, not to echo instructions. Prompt and response are tokenized separately
and concatenated, so the boundary between them is exact whatever the tokenizer merges.

Bad input never turns into a silently fully-masked example (a known trap: a prompt that fills the
context leaves no response token, the loss divides by zero tokens or the example just teaches nothing):
a record without `instruction`/`output` is a DataError naming the file and record; an empty output or a
prompt that alone reaches `max_len` is skipped and counted in `SFTData.skipped`; a response that does
not fit is cut (counted in `truncated`), keeping at least one response token.

Batches are either padded (each micro-batch padded on the right to its longest example; right padding
needs no attention mask in a causal model) or packed (examples concatenated into rows of `max_len`
tokens, as TRL's ConstantLengthDataset does: attention crosses example boundaries, a separator EOS
marks them). Both are pure functions of (step, micro), like the pretraining sources.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.data.batch import IGNORE_INDEX, Batch
from lmlab.errors import ConfigError, DataError
from lmlab.fileio import read_text

Record = dict[str, Any]  # instruction, input, output (str) + optional extra fields

# Stanford Alpaca's two prompts (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT), verbatim.
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_MARKER = "### Response:"


# ----------------------------------------------------------------------------------------------------
# records


def read_alpaca(path: str | Path) -> list[Record]:
    """An Alpaca JSON array (or JSONL). `instruction` and `output` are required; `input` may be absent."""
    path = Path(path)
    text = read_text(path, "instruction data")
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON/JSONL ({err})") from None
    return [check_record(r, f"{path}: record {i}") for i, r in enumerate(rows)]


def check_record(row: Any, where: str) -> Record:
    """A record with string `instruction`, `input` ("" if absent) and `output`; else a DataError."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with instruction/input/output, got {type(row).__name__}")
    for key in ("instruction", "output"):
        if key not in row:
            raise DataError(f"{where}: missing field {key!r} (has {sorted(row)})")
    out = {"instruction": row["instruction"], "input": row.get("input") or "", "output": row["output"]}
    for key, value in out.items():
        if not isinstance(value, str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return {**row, **out}  # extra fields (a QA item's references, its source) ride along


def split_records(records: list[Any], ratios: tuple[int, ...] = (5, 1, 1), seed: int = 42,
                  subset: int = 0) -> list[list[Any]]:
    """The seed's procedure: shuffle with `seed`, keep the first `subset` (0 = all), cut by `ratios`."""
    if not ratios or any(r < 0 for r in ratios) or sum(ratios) == 0:
        raise ConfigError(f"data.split={list(ratios)}: expected non-negative ratios, e.g. [5, 1, 1]")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    if subset:
        order = order[:subset]
    n, total, out, start = len(order), sum(ratios), [], 0
    for i, r in enumerate(ratios):
        end = n if i == len(ratios) - 1 else start + round(n * r / total)
        out.append([records[j] for j in order[start:end]])
        start = end
    return out


# ----------------------------------------------------------------------------------------------------
# templates


@dataclass
class Template:
    """Turns a record into a prompt; the response follows it. kind: alpaca | chat | custom (`text` with
    {instruction}, optional {input}, ending with `marker`, the point where the response starts)."""

    kind: str = "alpaca"
    text: str = ""
    marker: str = ALPACA_MARKER
    system: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("alpaca", "chat", "custom"):
            raise ConfigError(f"data.template={self.kind!r}: expected alpaca, chat or custom")
        if self.kind == "custom":
            if "{instruction}" not in self.text:
                raise ConfigError(f"data.custom_template={self.text!r}: must contain {{instruction}}")
            if not self.marker or not self.text.rstrip().endswith(self.marker):
                raise ConfigError(f"data.custom_template={self.text!r} does not end with the response marker "
                                  f"data.response_marker={self.marker!r}: the response could not be located")

    def prompt(self, record: Record, tokenizer: Any = None) -> str:
        """The text the model is given; the response follows it directly."""
        if self.kind == "chat":
            user = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
            messages = ([{"role": "system", "content": self.system}] if self.system else []) + \
                [{"role": "user", "content": user}]
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if self.kind == "alpaca":
            return (ALPACA_INPUT if record["input"] else ALPACA_NO_INPUT).format(**record)
        return self.text.format(instruction=record["instruction"], input=record["input"])

    def end_text(self, tokenizer: Any) -> str:
        """Text that closes a chat response (e.g. `<|im_end|>`), learned so generation stops there."""
        if self.kind != "chat":
            return ""
        user = [{"role": "user", "content": "x"}]
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": "Y"}], add_generation_prompt=False)
        if not full.startswith(prompt + "Y"):
            raise ConfigError("data.template=chat: this chat template does not render the reply right after its "
                              "generation prompt, so the response cannot be located; use alpaca or custom")
        return full[len(prompt) + 1:].rstrip("\n")


# ----------------------------------------------------------------------------------------------------
# tokenized examples


@dataclass
class Example:
    """Token ids of prompt + response; the first `n_prompt` are not trained on."""

    ids: list[int]
    n_prompt: int


@dataclass
class SFTData:
    """Encoded examples plus what was dropped or cut, and why."""

    examples: list[Example]
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0

    def summary(self) -> dict[str, Any]:
        return {"examples": len(self.examples), "skipped": dict(self.skipped), "truncated": self.truncated,
                "response_tokens": sum(len(e.ids) - e.n_prompt for e in self.examples)}


def encode_examples(records: list[Record], template: Template, tokenizer: Any, max_len: int,
                    add_eos: bool = True) -> SFTData:
    """Tokenize records; skip (and count) empty outputs and prompts that fill `max_len` alone."""
    data = SFTData([])
    bos = bool(tokenizer.add_bos and tokenizer.bos_id is not None)
    end = template.end_text(tokenizer)
    for rec in records:
        if not rec["output"].strip():
            data.skipped["empty_output"] += 1
            continue
        prompt = tokenizer.encode(template.prompt(rec, tokenizer), bos=bos)
        response = tokenizer.encode(rec["output"] + end) + ([tokenizer.eos_id] if add_eos and not end else [])
        if len(prompt) >= max_len:
            data.skipped["prompt_too_long"] += 1
            continue
        if len(prompt) + len(response) > max_len:
            response = response[: max_len - len(prompt)]
            data.truncated += 1
        data.examples.append(Example(prompt + response, len(prompt)))
    return data


def example_rows(ex: Example, full: bool = False) -> tuple[list[int], list[int]]:
    """(inputs, labels) of one example: labels[t] = ids[t+1], prompt targets ignored unless `full`."""
    labels = list(ex.ids[1:])
    if not full:
        labels[: ex.n_prompt - 1] = [IGNORE_INDEX] * (ex.n_prompt - 1)
    return ex.ids[:-1], labels


def collate_examples(examples: list[Example], pad_id: int, full: bool = False) -> Batch:
    """Right-padded batch; padding labels are IGNORE_INDEX. With `full`, every token is a target and
    `response_mask` marks the response targets (plain and conditional perplexity in one pass)."""
    T = max(len(e.ids) - 1 for e in examples)
    inputs = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    response = torch.zeros((len(examples), T), dtype=torch.bool)
    for i, ex in enumerate(examples):
        x, y = example_rows(ex, full)
        inputs[i, : len(x)], labels[i, : len(y)] = torch.tensor(x), torch.tensor(y)
        response[i, ex.n_prompt - 1: len(y)] = True
    batch = {"input_ids": inputs, "labels": labels}
    return {**batch, "response_mask": response} if full else batch


def pack(examples: list[Example], max_len: int, sep_id: int) -> list[tuple[list[int], list[int]]]:
    """Concatenate (inputs, labels) streams into rows of `max_len` tokens (the last row may be shorter)."""
    xs: list[int] = []
    ys: list[int] = []
    for ex in examples:
        x, y = example_rows(ex)
        xs += [sep_id] + x if xs else x
        ys += [IGNORE_INDEX] + y if ys else y
    rows = [(xs[i: i + max_len], ys[i: i + max_len]) for i in range(0, len(xs), max_len)]
    return [r for r in rows if any(t != IGNORE_INDEX for t in r[1])]


class InstructBatches:
    """Batch source for `fit`: a fresh seeded order each epoch; padded or packed micro-batches, each step's
    examples sorted by length across its micro-batches. A pure function of (step, micro), so resume is exact."""

    def __init__(self, examples: list[Example], batch_size: int, grad_accum: int, seed: int, pad_id: int,
                 packing: bool = False, max_len: int = 0) -> None:
        if not examples:
            raise DataError("no training examples left (all skipped?): check data.max_len and the data file")
        self.batch_size, self.grad_accum, self.seed, self.pad_id = batch_size, grad_accum, seed, pad_id
        self.items: list[Any] = pack(examples, max_len, pad_id) if packing else list(examples)
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self) / (self.batch_size * self.grad_accum))

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self)))
        return self._perm[1]

    def step_items(self, step: int) -> list[Any]:
        """The step's batch_size * grad_accum items, shortest first: consecutive micro-batches then hold
        similar lengths and pad little, and the step's (token-weighted) gradient is the same sum."""
        first = step * self.grad_accum * self.batch_size
        span = range(first, first + self.grad_accum * self.batch_size)
        items = [self.items[self._order(e)[i]] for e, i in (divmod(g, len(self)) for g in span)]
        return sorted(items, key=lambda it: len(it.ids) if isinstance(it, Example) else len(it[0]))

    def __call__(self, step: int, micro: int = 0) -> Batch:
        picks = self.step_items(step)[micro * self.batch_size: (micro + 1) * self.batch_size]
        if isinstance(picks[0], Example):
            return collate_examples(picks, self.pad_id)
        T = max(len(x) for x, _ in picks)
        inputs = torch.full((len(picks), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(picks), T), IGNORE_INDEX, dtype=torch.long)
        for r, (x, y) in enumerate(picks):
            inputs[r, : len(x)], labels[r, : len(y)] = torch.tensor(x), torch.tensor(y)
        return {"input_ids": inputs, "labels": labels}


def example_eval_batches(examples: list[Example], batch_size: int, pad_id: int, full: bool = False) -> list[Batch]:
    """Fixed batches in order, sorted by length so little padding is computed."""
    order = sorted(examples, key=lambda e: len(e.ids))
    return [collate_examples(order[i: i + batch_size], pad_id, full) for i in range(0, len(order), batch_size)]
