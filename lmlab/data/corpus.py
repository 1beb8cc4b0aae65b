"""Read raw text documents from a plain text file, JSONL/JSON records, CSV rows or a HF dataset.

Each reader returns the documents and the raw bytes that identify the corpus (for the token cache
key). Errors name the file, line and field at fault.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from pathlib import Path

from lmlab.errors import DataError
from lmlab.fileio import decode_text


def read_documents(path: str, *, field: str = "text", column: str = "text", separator: str = "record",
                   hf_split: str = "train") -> tuple[list[str], str]:
    """Documents of corpus `path` and a content hash of it.

    separator (plain text only): line = one document per non-empty line, blank_line = paragraphs,
    record/none = the whole file is one document.
    """
    if path.startswith("hf:"):
        return _read_hf(path[3:], field, hf_split)
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{path}: corpus file not found")
    raw = file.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    text = decode_text(raw, path, "corpus")
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        docs = _jsonl_docs(text, path, field)
    elif suffix == ".json":
        docs = _json_docs(text, path, field)
    elif suffix == ".csv":
        docs = _csv_docs(text, path, column)
    else:
        docs = _split_text(text, separator)
    docs = [d for d in docs if d]
    if not docs or not any(d.strip() for d in docs):
        raise DataError(f"{path}: the corpus is empty (no text)")
    return docs, digest


def _split_text(text: str, separator: str) -> list[str]:
    if separator == "line":
        return [line for line in text.splitlines() if line.strip()]
    if separator == "blank_line":
        return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]
    return [text]


def _jsonl_docs(text: str, path: str, field: str) -> list[str]:
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        docs.append(_field(record, field, f"{path}:{lineno}"))
    return docs


def _json_docs(text: str, path: str, field: str) -> list[str]:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON array of records")
    return [_field(r, field, f"{path} record {i}") for i, r in enumerate(records)]


def _field(record: object, field: str, where: str) -> str:
    if not isinstance(record, dict) or field not in record:
        raise DataError(f"{where}: record has no field {field!r} (set data.field)")
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is {type(value).__name__}, expected a string")
    return value


def _csv_docs(text: str, path: str, column: str) -> list[str]:
    reader = csv.DictReader(io.StringIO(text))
    try:
        if reader.fieldnames is None or column not in reader.fieldnames:
            raise DataError(f"{path}: no column {column!r} (columns: {reader.fieldnames}; set data.column)")
        return [row[column] or "" for row in reader]
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: not a valid CSV row ({err})") from None


def _read_hf(name: str, field: str, split: str) -> tuple[list[str], str]:
    """A Hugging Face dataset by name (needs `datasets` and a network connection)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"hf:{name}: reading Hugging Face datasets needs `pip install datasets`") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # offline, unknown name, ...: one clear line for the user
        raise DataError(f"hf:{name} (split {split}): could not load ({err})") from None
    if field not in ds.column_names:
        raise DataError(f"hf:{name}: no field {field!r} (fields: {ds.column_names}; set data.field)")
    docs = [str(t) for t in ds[field]]
    digest = f"hf:{name}:{split}:{ds._fingerprint}"
    if not docs:
        raise DataError(f"hf:{name} (split {split}): the corpus is empty")
    return docs, digest
