"""QA inference with task adapters (seed 004): stop strings, a validator per task, retry, routing.

One base model is loaded once; each task's LoRA adapter is added to it by name (lmlab/adapters/lora.py) and the
router activates the right one per request (`set_active_adapter`, no reload). Generation goes through
`lmlab.generation.generate.generate` only. An output the task's validator rejects is generated again, up to
`max_retries` times, sampled with a new seed each time (greedy output cannot change on retry).

The zero-shot MCQ baseline needs no generation: the option letter with the highest next-token
log-probability after the prompt is the answer (as lm-evaluation-harness scores MMLU), with every
adapter switched off.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmlab.adapters.files import load_adapter
from lmlab.adapters.lora import set_active_adapter
from lmlab.data.batch import pad_id_of
from lmlab.data.instruct import Record, Template
from lmlab.data.qa import LETTERS, is_option_letter
from lmlab.errors import ConfigError
from lmlab.evaluation.metrics import exact_match, token_f1
from lmlab.evaluation.scoring import token_logprobs
from lmlab.generation.generate import GenerationConfig, encode_prompt, generate, left_pad, length_batches
from lmlab.generation.sampling import SamplingConfig
from lmlab.precision import Precision
from lmlab.weights.loading import load_model

Validator = Callable[[str, Record], "str | None"]  # raw output -> cleaned answer, or None if invalid
_LETTER = re.compile(r"^\(?([A-J])[\.\):]?$")
PREAMBLES = ("the answer is", "answer:", "i think", "i believe", "sure", "as an ai", "i'm not sure",
             "i am not sure", "i don't know", "here is", "the correct answer")


def validate_mcq(text: str, record: Record) -> str | None:
    """A single option letter (a trailing '.', ')' or ':' and surrounding spaces are tolerated)."""
    m = _LETTER.match(text.strip())
    n = len(record.get("choices") or "ABCD")
    return m.group(1) if m and is_option_letter(m.group(1), n) else None


def validate_saq(text: str, record: Record, max_words: int = 10) -> str | None:
    """A short answer: one line, at most `max_words` words, no preamble ("The answer is ...")."""
    answer = text.strip().rstrip(".").strip()
    if not answer or "\n" in answer or len(answer.split()) > max_words:
        return None
    if answer.lower().startswith(PREAMBLES):
        return None
    return answer


@dataclass
class TaskSpec:
    """How one task is asked and checked."""

    adapter: str | None
    """LoRA adapter to activate (None = the base model alone)."""
    validator: Validator
    """Accepts or rejects an output."""
    max_new_tokens: int = 16
    """Short answers need few tokens; a long ramble is cut (and then rejected)."""
    stop_strings: tuple[str, ...] = ("\n",)
    """Generation stops at the first of these (the output is cut before it)."""


TASKS: dict[str, TaskSpec] = {
    "mcq": TaskSpec("mcq", validate_mcq, max_new_tokens=4),
    "saq": TaskSpec("saq", validate_saq, max_new_tokens=16),
}


@dataclass
class Answer:
    """One request's result."""

    text: str
    """The validated answer, or the last raw output when no attempt was valid."""
    valid: bool
    attempts: int
    """Generations it took (1 = valid at once)."""
    raw: list[str] = field(default_factory=list)


def answer_with_retry(model: nn.Module, tokenizer: Any, records: Sequence[Record], spec: TaskSpec,
                      template: Template, *, max_retries: int = 2, seed: int = 0,
                      retry_temperature: float = 0.7, top_p: float = 0.9, batch_size: int = 16,
                      first: SamplingConfig | None = None) -> list[Answer]:
    """Greedy first (or `first`'s sampling); rows whose output fails the validator are sampled again
    (temperature `retry_temperature`, top-p, a new seed per attempt) until valid or `max_retries` retries
    are spent.
    The temperature stays put: raising it per attempt (1.4 on the second retry) turned a 135M model's
    answers into word salad that still passed the SAQ validator."""

    prompts = [template.prompt(r, tokenizer) for r in records]
    results = [Answer("", False, 0) for _ in records]
    todo = list(range(len(records)))
    for attempt in range(max_retries + 1):
        if not todo:
            break
        sampling = (first or SamplingConfig(temperature=0.0)) if attempt == 0 else \
            SamplingConfig(temperature=retry_temperature, top_p=top_p)
        gen = GenerationConfig(spec.max_new_tokens, sampling, stop_strings=spec.stop_strings, seed=seed + attempt)
        outputs = generate(model, tokenizer, [prompts[i] for i in todo], gen, batch_size=batch_size)
        still = []
        for i, out in zip(todo, outputs):
            cleaned = spec.validator(out, records[i])
            res = results[i]
            res.attempts, res.raw = attempt + 1, res.raw + [out]
            res.valid, res.text = cleaned is not None, cleaned if cleaned is not None else out.strip()
            if cleaned is None:
                still.append(i)
        todo = still
    return results


class Router:
    """Picks the task (declared, or by rule) for each request and answers it with that task's adapter,
    on one loaded base model."""

    def __init__(self, model: nn.Module, tokenizer: Any, template: Template,
                 tasks: dict[str, TaskSpec] | None = None, max_retries: int = 2) -> None:
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.tasks, self.max_retries = dict(tasks or TASKS), max_retries

    @staticmethod
    def rule(record: Record) -> str:
        """No declared task: options (a `choices` list, or lines 'A. ...' 'B. ...') mean MCQ, else SAQ."""
        if record.get("choices") or re.search(r"^A[\.\)] .+\n^B[\.\)] ", record["instruction"], re.M):
            return "mcq"
        return "saq"

    def route(self, record: Record) -> str:
        task = record.get("task") or self.rule(record)
        if task not in self.tasks:
            raise ConfigError(f"request task {task!r}: no such task; known: {sorted(self.tasks)}")
        return task

    def answer(self, records: Sequence[Record], seed: int = 0) -> list[tuple[str, Answer]]:
        """(task, answer) per request, in order; requests are grouped per adapter."""
        routed = [self.route(r) for r in records]
        out: list[tuple[str, Answer] | None] = [None] * len(records)
        for task in dict.fromkeys(routed):
            spec = self.tasks[task]
            set_active_adapter(self.model, spec.adapter)
            idx = [i for i, t in enumerate(routed) if t == task]
            answers = answer_with_retry(self.model, self.tokenizer, [records[i] for i in idx], spec, self.template,
                                        max_retries=self.max_retries, seed=seed)
            for i, a in zip(idx, answers):
                out[i] = (task, a)
        return out  # type: ignore[return-value]


def load_router(base: str, adapters: dict[str, str | Path], template: Template | None = None,
                device: str = "cpu", max_retries: int = 2) -> Router:
    """Load `base` once and add each saved adapter (lmlab or peft folder) under its task name."""

    loaded = load_model(base, device=device)
    for task, folder in adapters.items():
        load_adapter(loaded.model, folder, name=task)
    tasks = {t: TaskSpec(t if t in adapters else None, s.validator, s.max_new_tokens, s.stop_strings)
             for t, s in TASKS.items()}
    tokenizer = loaded.require_tokenizer("put a tokenizer file beside --base")
    return Router(loaded.model, tokenizer, template or Template("chat"), tasks, max_retries)


# ----------------------------------------------------------------------------------------------------
# scoring


@torch.no_grad()
def letter_logprob_predict(model: nn.Module, tokenizer: Any, records: Sequence[Record], template: Template,
                           batch_size: int = 16) -> list[str]:
    """Zero-shot MCQ: the option letter whose token is most likely right after the prompt.
    Prompts run in length-sorted batches (little padding); predictions come back in record order."""

    model.eval()  # as generate does: dropout (a LoRA adapter's too) off while scoring
    letter_ids = [tokenizer.encode(ch)[0] for ch in LETTERS]
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    device = next(model.parameters()).device
    all_ids = [encode_prompt(tokenizer, template.prompt(r, tokenizer)) for r in records]
    preds = [""] * len(records)
    for rows in length_batches([len(x) for x in all_ids], batch_size):
        tokens, mask = left_pad([all_ids[i] for i in rows], pad)  # the last position is every row's next token
        logits = model(tokens.to(device), mask.to(device), last_only=True)[:, -1].float()
        for row, i in zip(logits, rows):
            n = len(records[i].get("choices") or "ABCD")
            preds[i] = LETTERS[int(row[letter_ids[:n]].argmax())]
    return preds


@torch.no_grad()
def cloze_predict(model: nn.Module, tokenizer: Any, records: Sequence[Record], batch_size: int = 32,
                  precision: Any = None) -> tuple[list[str], list[str]]:
    """MCQ as cloze (the OLMES "CF" formulation): after "Question: ...\nAnswer:", the option whose own
    text is most likely, no letters shown. It measures what the model knows apart from its skill with
    letter formats. Returns the letters picked by total log-probability and by log-probability per
    character (lm-evaluation-harness's acc and acc_norm). Only the option positions are projected to
    the vocabulary (the classifier's `token_logprobs`)."""

    model.eval()
    precision = _precision(model, precision)
    bos = bool(tokenizer.add_bos and tokenizer.bos_id is not None)
    seqs, where = [], []  # one sequence per (record, option); the positions that predict the option's tokens
    for r in records:
        context = tokenizer.encode(f"Question: {r['question'].strip()}\nAnswer:", bos=bos)
        for c in r["choices"]:
            option = tokenizer.encode(" " + c.strip())
            seqs.append(context + option)
            where.append(list(range(len(context) - 1, len(context) - 1 + len(option))))
    logp = [0.0] * len(seqs)
    for rows in length_batches([len(x) for x in seqs], batch_size):
        lps = token_logprobs(model, [seqs[i] for i in rows], [where[i] for i in rows], pad_id_of(tokenizer), precision)
        for i, lp in zip(rows, lps):
            option = torch.tensor([seqs[i][t + 1] for t in where[i]], dtype=torch.long)
            logp[i] = float(lp[torch.arange(len(option)), option].sum())
    raw, norm, k = [], [], 0
    for r in records:
        n = len(r["choices"])
        scores = logp[k: k + n]
        per_char = [s / max(len(c.strip()), 1) for s, c in zip(scores, r["choices"])]
        raw.append(LETTERS[max(range(n), key=scores.__getitem__)])
        norm.append(LETTERS[max(range(n), key=per_char.__getitem__)])
        k += n
    return raw, norm


def _precision(model: nn.Module, precision: Any) -> Any:
    """The given Precision, or fp32 on the model's device."""
    return precision if precision is not None else Precision(next(model.parameters()).device)


def mcq_accuracy(correct: Sequence[int], records: Sequence[Record]) -> dict[str, Any]:
    """Accuracy overall and per source (`accuracy_mmlu`, `accuracy_arc`), and each question's 0/1
    (`correct`) for paired tests."""
    out: dict[str, Any] = {"accuracy": sum(correct) / max(len(records), 1), "correct": list(correct)}
    for src in sorted({r.get("source", "") for r in records} - {""}):
        sub = [c for c, r in zip(correct, records) if r.get("source") == src]
        out[f"accuracy_{src}"] = sum(sub) / len(sub)
    return out


def score(task: str, records: Sequence[Record], answers: Sequence[Answer]) -> dict[str, Any]:
    """Accuracy (MCQ, with each item's 0/1 for paired tests) or EM/F1 (SAQ), plus the share that needed
    a retry and the share left invalid."""

    n = max(len(records), 1)
    out = {"n": len(records), "valid_first_try": sum(a.attempts == 1 and a.valid for a in answers) / n,
           "valid_after_retry": sum(a.valid for a in answers) / n,
           "needed_retry": sum(a.attempts > 1 for a in answers) / n,
           "invalid": sum(not a.valid for a in answers) / n}
    if task == "mcq":
        out |= mcq_accuracy([int(a.valid and a.text == r["output"]) for r, a in zip(records, answers)], records)
    else:
        out["exact_match"] = sum(exact_match(a.text, r["answers"]) for r, a in zip(records, answers)) / n
        out["f1"] = sum(token_f1(a.text, r["answers"]) for r, a in zip(records, answers)) / n
    return out
