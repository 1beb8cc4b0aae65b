"""Labelled text for sentence classification: the minllama `LABEL ||| text` files (SST-5, CFIMDB),
generic CSV / JSONL with a column mapping, and SST-2 derived from SST-5.

Every reader returns a `LabeledTexts`; a bad line is a DataError naming the file and line. Empty lines
are skipped and counted (never silently), so a report can say how many there were.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmlab.data.batch import IGNORE_INDEX, Batch, right_pad
from lmlab.errors import ConfigError, DataError
from lmlab.fileio import atomic_write_text, read_text

SEPARATOR = " ||| "
SST2_NAMES = ["negative", "positive"]
# SST-5 -> SST-2 (Socher et al. 2013): 0,1 negative; 3,4 positive; 2 (neutral) dropped
SST5_TO_SST2 = {0: 0, 1: 0, 3: 1, 4: 1}


@dataclass
class LabeledTexts:
    """One split: texts, integer labels (indices into `label_names`) and what reading skipped."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    source: str = ""
    skipped_empty: int = 0
    dropped: int = 0
    """Examples left out on purpose (e.g. neutral sentences when deriving SST-2)."""
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def sample(self, n: int, seed: int = 0) -> "LabeledTexts":
        """A seeded random n of the examples, in file order (0 = all). Not the first n: data files are
        often sorted by label (SST-5's first 3,000 training lines are 50% label 3 and 1% label 0)."""
        if n <= 0 or n >= len(self):
            return self
        import random

        keep = sorted(random.Random(seed).sample(range(len(self)), n))
        return LabeledTexts([self.texts[i] for i in keep], [self.labels[i] for i in keep], self.label_names,
                            self.source, self.skipped_empty, self.dropped,
                            [*self.notes, f"a random {n} of {len(self)} examples (seed {seed})"])


def read_label_names(path: str | Path) -> list[str]:
    """A JSON list (index = label id), as the minllama `*-label-mapping.json` files."""
    try:
        names = json.loads(read_text(path, "label-name mapping"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if isinstance(names, dict):  # {"0": "bad", "1": "good"} is accepted too
        try:
            names = [names[k] for k in sorted(names, key=int)]
        except ValueError:
            raise DataError(f"{path}: a mapping object needs integer keys 0..N-1") from None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"{path}: expected a JSON list of label names, e.g. [\"bad\", \"good\"]")
    return names


def _label_id(raw: str, names: list[str], where: str) -> int:
    """An integer label in range, or a label name from the mapping."""
    raw = raw.strip()
    if raw in names:
        return names.index(raw)
    try:
        label = int(raw)
    except ValueError:
        raise DataError(f"{where}: label {raw!r} is neither an integer nor one of {names}") from None
    if not 0 <= label < len(names):
        raise DataError(f"{where}: label {label} is outside the mapping 0..{len(names) - 1} ({names})")
    return label


def read_pipe_file(path: str | Path, label_names: list[str]) -> LabeledTexts:
    """`LABEL ||| text` per line (minllama SST / CFIMDB)."""
    texts, labels, empty = [], [], 0
    for lineno, line in enumerate(_lines(path), 1):
        if not line.strip():
            empty += 1
            continue
        label, sep, text = line.partition(SEPARATOR.strip())
        where = f"{path}:{lineno}"
        if not sep:
            raise DataError(f"{where}: no '{SEPARATOR.strip()}' separator; expected `LABEL ||| text`")
        labels.append(_label_id(label, label_names, where))
        texts.append(text.strip())
    return LabeledTexts(texts, labels, label_names, str(path), skipped_empty=empty)


def read_table(path: str | Path, label_names: list[str], text_field: str = "text",
               label_field: str = "label") -> LabeledTexts:
    """CSV (header row) or JSONL records; `text_field` and `label_field` name the columns/keys.
    A label may be an integer id or one of the label names."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl"):
        raise DataError(f"{path}: expected a .csv, .tsv or .jsonl file (or a `LABEL ||| text` file with format=pipe)")
    texts, labels, empty = [], [], 0
    for where, record in _records(path, suffix):
        if record is None:
            empty += 1
            continue
        for key in (text_field, label_field):
            if key not in record:
                raise DataError(f"{where}: no field {key!r}; fields: {sorted(record)}")
        text = str(record[text_field] or "").strip()
        if not text:
            empty += 1
            continue
        labels.append(_label_id(str(record[label_field]), label_names, where))
        texts.append(text)
    return LabeledTexts(texts, labels, label_names, str(path), skipped_empty=empty)


def _records(path: str | Path, suffix: str):
    """(where, record dict or None for an empty line) for each row."""
    lines = _lines(path)
    if suffix == ".jsonl":
        for lineno, line in enumerate(lines, 1):
            where = f"{path}:{lineno}"
            if not line.strip():
                yield where, None
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object per line")
            yield where, record
        return
    reader = csv.DictReader(lines, delimiter="\t" if suffix == ".tsv" else ",")
    try:
        for record in reader:
            where = f"{path}:{reader.line_num}"
            if None in record:  # more fields than the header names
                raise DataError(f"{where}: {len(record) - 1 + len(record[None])} fields, the header names "
                                f"{len(reader.fieldnames or [])}")
            yield where, record if any((v or "").strip() for v in record.values()) else None
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: not a valid CSV row ({err})") from None


def _lines(path: str | Path) -> list[str]:
    return read_text(path, "data file").splitlines()


def to_sst2(data: LabeledTexts) -> LabeledTexts:
    """SST-2 from SST-5: drop neutral (2), merge 0,1 -> negative and 3,4 -> positive."""
    if len(data.label_names) != 5:
        raise DataError(f"{data.source}: SST-2 is derived from 5-class SST labels, got {data.label_names}")
    keep = [i for i, y in enumerate(data.labels) if y in SST5_TO_SST2]
    return LabeledTexts([data.texts[i] for i in keep], [SST5_TO_SST2[data.labels[i]] for i in keep], SST2_NAMES,
                        data.source, data.skipped_empty, len(data) - len(keep), [*data.notes, "SST-2 from SST-5"])


def read_split(path: str | Path, label_names: list[str], fmt: str = "auto", text_field: str = "text",
               label_field: str = "label", sst2: bool = False) -> LabeledTexts:
    """Read one split in `fmt` (auto: by suffix; .txt = pipe); optionally derive SST-2."""
    if fmt == "auto":
        fmt = "table" if Path(path).suffix.lower() in (".csv", ".tsv", ".jsonl") else "pipe"
    if fmt == "pipe":
        data = read_pipe_file(path, label_names)
    elif fmt == "table":
        data = read_table(path, label_names, text_field, label_field)
    else:
        raise DataError(f"data format {fmt!r}: expected auto, pipe or table")
    data = to_sst2(data) if sst2 else data
    if not len(data):  # metrics over 0 examples (accuracy 0.000) or an epoch of 0 steps mean nothing
        why = f"{data.skipped_empty} empty line(s)" if data.skipped_empty else "the file is empty"
        why += f", {data.dropped} dropped" if data.dropped else ""
        raise DataError(f"{path}: no examples ({why}); expected `LABEL ||| text` lines or table rows")
    return data


__all__ = ["LabeledTexts", "read_label_names", "read_pipe_file", "read_table", "read_split", "to_sst2",
           "SST2_NAMES"]


TEXT = "{text}"



_SENTINEL = "\x00TEXT\x00"



TRUNCATIONS = ("head", "tail", "middle")



@dataclass
class PromptFormat:
    """Token ids around the text: BOS + prefix + text (truncated) + suffix."""

    prefix: list[int]
    suffix: list[int]
    max_len: int
    truncation: str = "middle"

    def encode(self, tokenizer, text: str) -> tuple[list[int], bool]:
        """(ids, whether the text was truncated to fit max_len)."""
        ids = tokenizer.encode(text)
        room = self.max_len - len(self.prefix) - len(self.suffix)
        if room <= 0:
            raise ConfigError(f"max_len={self.max_len} leaves no room for text after the template's "
                              f"{len(self.prefix) + len(self.suffix)} tokens")
        cut = len(ids) > room
        if cut:
            ids = truncate(ids, room, self.truncation)
        return self.prefix + ids + self.suffix, cut



def truncate(ids: list[int], n: int, how: str) -> list[int]:
    """Keep n tokens: the start (head), the end (tail), or the first quarter and last three quarters
    (middle: Sun et al. 2019 found head+tail best for long reviews, where verdicts sit at the end)."""
    if how == "head":
        return ids[:n]
    if how == "tail":
        return ids[len(ids) - n:]
    if how == "middle":
        first = n // 4
        return ids[:first] + ids[len(ids) - (n - first):]
    raise ConfigError(f"truncation={how!r}: expected one of {TRUNCATIONS}")



def prompt_format(tokenizer, template: str, max_len: int, *, chat: bool = False, system: str = "",
                  truncation: str = "middle") -> PromptFormat:
    """Split `template` (which must hold {text}) into prefix/suffix ids; with `chat` the template is the
    user turn of the tokenizer's chat template and the suffix ends at the assistant's turn."""
    if template.count(TEXT) != 1:
        raise ConfigError(f"template {template!r}: must contain {TEXT} exactly once")
    if truncation not in TRUNCATIONS:
        raise ConfigError(f"truncation={truncation!r}: expected one of {TRUNCATIONS}")
    text = template.replace(TEXT, _SENTINEL)
    bos: list[int] = []
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    elif tokenizer.add_bos and tokenizer.bos_id is not None:
        bos = [tokenizer.bos_id]
    before, after = text.split(_SENTINEL)
    return PromptFormat(bos + tokenizer.encode(before), tokenizer.encode(after), max_len, truncation)



def encode_all(tokenizer, fmt: PromptFormat, texts: Sequence[str]) -> tuple[list[list[int]], int]:
    """Encoded texts and how many were truncated."""
    out, n_cut = [], 0
    for t in texts:
        ids, cut = fmt.encode(tokenizer, t)
        out.append(ids)
        n_cut += cut
    return out, n_cut



class EpochBatches:
    """The training batch source for `fit`: a fresh seeded shuffle each epoch, `batch_size` examples per
    optimizer step split into `grad_accum` micro-batches. The last step of an epoch may be smaller."""

    def __init__(self, seqs: list[list[int]], labels: list[int], batch_size: int, grad_accum: int, seed: int,
                 pad_id: int) -> None:
        if batch_size <= 0 or grad_accum <= 0:
            raise ConfigError(f"train.batch_size={batch_size} and train.grad_accum={grad_accum} must be > 0")
        self.seqs, self.labels, self.pad_id = seqs, labels, pad_id
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.steps_per_epoch = math.ceil(len(seqs) / batch_size)
        self._epoch, self._order = -1, torch.arange(0)

    def __call__(self, step: int, micro: int) -> Batch:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.seqs), generator=g)
        step_idx = self._order[k * self.batch_size:(k + 1) * self.batch_size]
        # micro-batches of similar lengths: less padding, the same examples in the same optimizer step
        step_idx = step_idx[torch.tensor([len(self.seqs[i]) for i in step_idx]).argsort(stable=True)]
        idx = step_idx.tensor_split(self.grad_accum)[micro]
        labels = [self.labels[i] for i in idx]
        if len(idx) == 0:  # a last step smaller than grad_accum: one example that counts for nothing
            idx, labels = self._order[:1], [IGNORE_INDEX]
        ids, mask = right_pad([self.seqs[i] for i in idx], self.pad_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(labels)}


def write_predictions(path: str | Path, preds: Sequence[int], texts: Sequence[str]) -> Path:
    """`PRED ||| text` per line, the minllama `write_predictions_to_file` format."""
    lines = "".join(f"{p} ||| {t}\n" for p, t in zip(preds, texts, strict=True))
    atomic_write_text(Path(path), lines)
    return Path(path)



def read_predictions(path: str | Path) -> list[int]:
    """The predicted labels of a prediction file (tests, re-scoring)."""
    return [int(line.split(" ||| ", 1)[0]) for line in Path(path).read_text().splitlines() if line]
