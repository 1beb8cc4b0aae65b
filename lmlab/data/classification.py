"""Labelled text for sentence classification: the minllama `LABEL ||| text` files (SST-5, CFIMDB),
generic CSV / JSONL with a column mapping, and SST-2 derived from SST-5.

Every reader returns a `LabeledTexts`; a bad line is a DataError naming the file and line. Empty lines
are skipped and counted (never silently), so a report can say how many there were.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from lmlab.errors import DataError

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
        names = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: label-name mapping not found") from None
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
    for record in reader:
        where = f"{path}:{reader.line_num}"
        yield where, record if any((v or "").strip() for v in record.values()) else None


def _lines(path: str | Path) -> list[str]:
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: data file not found") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start})") from None


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
    return to_sst2(data) if sst2 else data


__all__ = ["LabeledTexts", "read_label_names", "read_pipe_file", "read_table", "read_split", "to_sst2",
           "SST2_NAMES"]
