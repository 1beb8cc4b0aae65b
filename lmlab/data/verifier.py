"""Labelled solutions for a verifier (Cobbe et al. 2021): the JSONL file `lmlab verifier sample` writes, the
examples it becomes (prompt + solution token ids, the label) and the batches `verifier_loss` reads.

A line of the labelled set: {"problem": index in the problem file, "sample": k (-1 for the reference
solution), "source": "sample" | "gold", "solution": text, "answer": the extracted final answer or null,
"reference": the reference final answer, "correct": bool}. Batches are right-padded with an attention
mask; `value_mask` marks the positions whose value trains (every solution token, or the last one),
`lm_labels` the next-token targets on the solution for the joint language-modelling loss.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lmlab.data.batch import IGNORE_INDEX, Batch
from lmlab.data.instruct import Example, InstructBatches, Record, Template
from lmlab.errors import DataError
from lmlab.fileio import atomic_write_text, read_text

FIELDS = ("problem", "sample", "source", "solution", "answer", "reference", "correct")


@dataclass
class Solution:
    """One labelled solution of one problem."""

    problem: int
    sample: int
    source: str
    solution: str
    answer: str | None
    reference: str
    correct: bool


def write_solutions(path: Path, solutions: Sequence[Solution]) -> None:
    """The labelled set as JSONL, written atomically."""
    atomic_write_text(path, "".join(json.dumps(asdict(s)) + "\n" for s in solutions))


def read_solutions(path: str | Path) -> list[Solution]:
    """A labelled set; a missing file, bad JSON or a missing field is a DataError naming the line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: labelled solutions not found (run `lmlab verifier sample` first)")
    lines = read_text(path, "labelled-solutions file").splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {i + 1}: not valid JSON ({err})") from None
        missing = [k for k in FIELDS if k not in row]
        if missing:
            raise DataError(f"{path}: line {i + 1}: missing field(s) {missing}")
        out.append(Solution(**{k: row[k] for k in FIELDS}))
    return out


@dataclass
class LabelledExample(Example):
    """prompt + solution ids (the first n_prompt are the prompt), the label and the problem it solves."""

    label: float = 0.0
    problem: int = 0


def encode_solutions(solutions: Sequence[Solution], records: Sequence[Record], template: Template, tokenizer: Any,
                     max_len: int) -> tuple[list[LabelledExample], int]:
    """Examples in the solutions' order, and how many were cut to max_len (the prompt is kept whole; a
    prompt that alone reaches max_len is a DataError naming the problem)."""
    bos = bool(tokenizer.add_bos and tokenizer.bos_id is not None)
    prompts: dict[int, list[int]] = {}
    out, cut = [], 0
    for s in solutions:
        if s.problem not in prompts:
            prompts[s.problem] = tokenizer.encode(template.prompt(records[s.problem], tokenizer), bos=bos)
            if len(prompts[s.problem]) >= max_len:
                raise DataError(f"problem {s.problem}: its prompt has {len(prompts[s.problem])} tokens, "
                                f"data.max_len={max_len} leaves no room for a solution")
        prompt = prompts[s.problem]
        ids = prompt + tokenizer.encode(s.solution)
        if len(ids) > max_len:
            ids, cut = ids[:max_len], cut + 1
        out.append(LabelledExample(ids, len(prompt), float(s.correct), s.problem))
    return out, cut


def collate_labelled(examples: Sequence[LabelledExample], pad_id: int, target: str = "token",
                     lm: bool = False) -> Batch:
    """Right-padded batch for `verifier_loss`: input_ids, attention_mask, value_mask, labels (and lm_labels,
    lm_weight with `lm`). target=token counts the value at every solution token (the last position when the
    solution is empty); target=solution only at the last token."""
    T = max(len(e.ids) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    value_mask = torch.zeros((B, T), dtype=torch.bool)
    lm_labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    lm_weight = torch.zeros((B, T), dtype=torch.float32)
    for i, e in enumerate(examples):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        attention[i, :n] = 1
        if target == "token" and n > e.n_prompt:
            value_mask[i, e.n_prompt : n] = True
        else:
            value_mask[i, n - 1] = True
        if n > e.n_prompt:  # position t predicts token t + 1: the solution's tokens
            lm_labels[i, e.n_prompt - 1 : n - 1] = torch.tensor(e.ids[e.n_prompt :])
            lm_weight[i, e.n_prompt - 1 : n - 1] = 1.0 if target == "token" else 1.0 / (n - e.n_prompt)
    batch = {"input_ids": ids, "attention_mask": attention, "value_mask": value_mask,
             "labels": torch.tensor([e.label for e in examples], dtype=torch.float32)}
    return {**batch, "lm_labels": lm_labels, "lm_weight": lm_weight} if lm else batch


class LabelledBatches(InstructBatches):
    """Batch source for `fit` over labelled examples: InstructBatches' seeded epochs and length-sorted steps
    (a pure function of (step, micro), so resume is exact), collated for `verifier_loss`."""

    def __init__(self, examples: list[LabelledExample], batch_size: int, grad_accum: int, seed: int, pad_id: int,
                 target: str, lm: bool) -> None:
        super().__init__(examples, batch_size, grad_accum, seed, pad_id)
        self.target, self.lm = target, lm

    def __call__(self, step: int, micro: int = 0) -> Batch:
        picks = self.step_items(step)[micro * self.batch_size : (micro + 1) * self.batch_size]
        return collate_labelled(picks, self.pad_id, self.target, self.lm)


def labelled_eval_batches(examples: Sequence[LabelledExample], batch_size: int, pad_id: int, target: str,
                          lm: bool) -> list[Batch]:
    """Fixed batches in length order (validation loss)."""
    order = sorted(examples, key=lambda e: len(e.ids))
    return [collate_labelled(order[i : i + batch_size], pad_id, target, lm) for i in range(0, len(order), batch_size)]
