"""Summarization, math and sentiment data as instruction records (seed 001, phase 2).

DialogSum (Chen et al. 2021; JSONL `{dialogue, summary}`), GSM8K (Cobbe et al. 2021; JSONL
`{question, answer}` whose last line is `#### <number>`), and SST-2 derived from the SST-5 files here
(`LABEL ||| sentence`: drop neutral 2, 0-1 -> negative, 3-4 -> positive, as GLUE's SST-2 is built).
"""

from __future__ import annotations

import re
from pathlib import Path

from lmlab.data.instruct import Record
from lmlab.data.qa import _jsonl
from lmlab.errors import DataError
from lmlab.fileio import read_text

DIALOGSUM_INSTRUCTION = "Summarize the following dialogue in one or two sentences."
GSM8K_INSTRUCTION = "Solve the math word problem. Reason step by step, then give the final answer after '####'."
SST2_INSTRUCTION = "Is the sentiment of this movie review positive or negative? Answer with one word."
_CALC = re.compile(r"<<[^>]*>>")
SST5_LABELS = ("0", "1", "2", "3", "4")


def dialogsum_records(path: str | Path) -> list[Record]:
    out = []
    for i, row in _jsonl(path):
        refs = [row[k] for k in ("summary", "summary1", "summary2", "summary3") if k in row]
        if not isinstance(row.get("dialogue"), str) or not refs or not all(isinstance(r, str) for r in refs):
            raise DataError(f"{path}: line {i}: expected {{dialogue, summary}} strings")
        out.append({"instruction": DIALOGSUM_INSTRUCTION, "input": row["dialogue"], "output": refs[0],
                    "task": "summarize", "answers": refs})
    return out


def gsm8k_records(path: str | Path) -> list[Record]:
    """The target is the worked solution without calculator annotations (`<<48/2=24>>`)."""
    out = []
    for i, row in _jsonl(path):
        answer = row.get("answer")
        if not isinstance(row.get("question"), str) or not isinstance(answer, str) or "####" not in answer:
            raise DataError(f"{path}: line {i}: expected {{question, answer ending in '#### N'}}")
        solution = _CALC.sub("", row["answer"])
        final = solution.rsplit("####", 1)[1].strip()
        out.append({"instruction": f"{GSM8K_INSTRUCTION}\n\n{row['question']}", "input": "", "output": solution,
                    "task": "math", "answers": [final], "question": row["question"]})
    return out


def sst2_records(path: str | Path) -> list[Record]:
    """SST-2 from an SST-5 `LABEL ||| sentence` file (neutral dropped)."""
    out = []
    for i, line in enumerate(read_text(path, "SST file").splitlines()):
        if not line.strip():
            continue
        label, sep, text = line.partition("|||")
        if not sep or label.strip() not in SST5_LABELS:
            raise DataError(f"{path}: line {i + 1}: expected 'LABEL ||| sentence' with LABEL one of 0-4")
        if label.strip() == "2":
            continue
        answer = "positive" if int(label) >= 3 else "negative"
        out.append({"instruction": SST2_INSTRUCTION, "input": text.strip(), "output": answer, "task": "sst2",
                    "answers": [answer]})
    return out
