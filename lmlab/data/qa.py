"""Question answering data as instruction records (seed 004): multiple choice and short answer.

MCQ: MMLU (headerless CSV `question,A,B,C,D,answer`, one file per subject, Hendrycks et al. 2021) and
ARC-Challenge (JSONL, `question.stem`, `question.choices[{label,text}]`, `answerKey`; Clark et al. 2018).
The prompt lists lettered options; the answer is one letter. SAQ: NaturalQuestions-open (JSONL
`{question, answer: [str, ...]}`; Lee et al. 2019): the answer is a short span, any reference counts.
Each record carries `task`, `source`, `answers` (all references) and `choices` for evaluation.
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

from lmlab.data.instruct import Record
from lmlab.errors import DataError
from lmlab.fileio import read_text

LETTERS = "ABCDEFGHIJ"
MCQ_INSTRUCTION = "Answer the following multiple choice question with the letter of the correct option only."
SAQ_INSTRUCTION = "Answer the question with a short answer of a few words, without explanation."


def mcq_instruction(question: str, choices: list[str]) -> str:
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{MCQ_INSTRUCTION}\n\nQuestion: {question.strip()}\n{options}"


def saq_instruction(question: str) -> str:
    q = question.strip()
    return f"{SAQ_INSTRUCTION}\n\nQuestion: {q if q.endswith('?') else q + '?'}"


def is_option_letter(answer: object, n_options: int) -> bool:
    """Exactly one of the first `n_options` letters ("BC", "" and "b" are not)."""
    return isinstance(answer, str) and len(answer) == 1 and answer in LETTERS[:n_options]


def _mcq(question: str, choices: list[str], answer: str, source: str, where: str) -> Record:
    if not is_option_letter(answer, len(choices)):
        raise DataError(f"{where}: answer {answer!r} is not one of the option letters {LETTERS[:len(choices)]}")
    return {"instruction": mcq_instruction(question, choices), "input": "", "output": answer, "task": "mcq",
            "source": source, "answers": [answer], "choices": choices, "question": question}


def permute_options(records: list[Record], k: int, seed: int) -> list[Record]:
    """Each MCQ record `k` times, its options rotated by k different shifts (the first one seeded per
    record, then evenly spaced), answer letter relabelled. A model of this size learns "answer B" from
    the letter frequencies of a small training set; with every question shown under several orders, the
    letter carries no information and only the option text can predict the answer.
    k <= 1 returns the records as they are; copies of a record are adjacent (the batcher shuffles)."""
    if k <= 1:
        return list(records)
    out = []
    for i, r in enumerate(records):
        n = len(r["choices"])
        first = random.Random(f"{seed}:{i}").randrange(n)
        for j in range(min(k, n)):
            shift = (first + j * n // min(k, n)) % n
            order = [(p + shift) % n for p in range(n)]  # new position p shows old option order[p]
            choices = [r["choices"][o] for o in order]
            answer = LETTERS[order.index(LETTERS.index(r["output"]))]
            out.append(r | {"instruction": mcq_instruction(r["question"], choices), "output": answer,
                            "answers": [answer], "choices": choices})
    return out


def read_mmlu(path: str | Path) -> list[Record]:
    """A subject CSV, or a folder of them (sorted, so the order never depends on the file system)."""
    path = Path(path)
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise DataError(f"{path}: no MMLU .csv file found")
    out = []
    for f in files:
        try:
            rows = list(csv.reader(io.StringIO(read_text(f, "MMLU .csv file"), newline="")))
        except csv.Error as err:
            raise DataError(f"{f}: not a CSV file ({err})") from None
        for i, row in enumerate(rows):
            if len(row) != 6:
                raise DataError(f"{f}: row {i + 1}: expected 6 fields (question, A, B, C, D, answer), got {len(row)}")
            out.append(_mcq(row[0], row[1:5], row[5].strip(), "mmlu", f"{f}: row {i + 1}"))
    return out


def read_arc(path: str | Path) -> list[Record]:
    """ARC JSONL; options are relabelled A, B, ... in their given order."""
    out = []
    for i, row in _jsonl(path):
        where = f"{path}: line {i}"
        try:
            choices = row["question"]["choices"]
            labels = [c["label"] for c in choices]
            answer = LETTERS[labels.index(row["answerKey"])]
            out.append(_mcq(row["question"]["stem"], [c["text"] for c in choices], answer, "arc", where))
        except (KeyError, ValueError, TypeError) as err:
            raise DataError(f"{where}: not an ARC record ({err})") from None
    return out


def mcq_records(path: str | Path) -> list[Record]:
    """MMLU (a .csv or a folder of them) or ARC (.jsonl), by the path."""
    return read_arc(path) if str(path).endswith(".jsonl") else read_mmlu(path)


def saq_records(path: str | Path) -> list[Record]:
    """NQ-open JSONL: the first reference is the training target; all count at evaluation."""
    out = []
    for i, row in _jsonl(path):
        answers = row.get("answer")
        if not isinstance(row.get("question"), str) or not isinstance(answers, list) or not answers or \
                not all(isinstance(a, str) and a.strip() for a in answers):
            raise DataError(f"{path}: line {i}: expected {{question, answer: [str, ...]}}")
        out.append({"instruction": saq_instruction(row["question"]), "input": "", "output": answers[0],
                    "task": "saq", "source": "nq", "answers": answers, "question": row["question"]})
    return out


def _jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) of each non-blank line of a JSONL file; each line must be a JSON object."""
    rows = []
    for i, line in enumerate(read_text(path, "JSONL file").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {i}: not valid JSON ({err})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {i}: expected a JSON object, got {type(row).__name__}")
            rows.append((i, row))
    return rows
