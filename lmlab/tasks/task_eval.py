"""Generation-based evaluation on a task's test split: zero-shot and few-shot prompting of the base model,
and the same prompts with a tuned adapter, so every row of the results table is measured the same way.

Tasks: sst2 (accuracy of the first word, positive/negative), summarize (DialogSum ROUGE-1/2/L), math
(GSM8K final-answer exact match), mcq (accuracy, plus the zero-shot letter log-probability baseline) and
saq (NQ-open EM/F1); mcq and saq answers pass their validator with retries (lmlab/tasks/qa.py).
Few-shot examples are earlier chat turns (user/assistant pairs) drawn from the training split, so they
never overlap the test items.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

from lmlab.adapters.files import load_adapter
from lmlab.adapters.lora import disable_lora
from lmlab.data.instruct import Record, Template
from lmlab.errors import ConfigError
from lmlab.evaluation.metrics import extract_number, gsm8k_match, rouge
from lmlab.generation.generate import GenerationConfig, generate
from lmlab.generation.sampling import SamplingConfig
from lmlab.precision import Precision, resolve_device
from lmlab.schema.load import load_config
from lmlab.schema.sft import SFTConfig
from lmlab.tasks.qa import TASKS, answer_with_retry, cloze_predict, letter_logprob_predict, mcq_accuracy, score
from lmlab.tasks.sft import load_splits, make_template
from lmlab.weights.loading import load_model

MAX_NEW_TOKENS = {"sst2": 4, "summarize": 96, "math": 256, "mcq": 4, "saq": 16}
TASK_OF_SOURCE = {"sst2": "sst2", "dialogsum": "summarize", "gsm8k": "math", "mcq": "mcq", "saq": "saq"}


class FewShotTemplate(Template):
    """The chat template with `shots` solved examples as earlier turns."""

    def __init__(self, shots: Sequence[Record], system: str | None = None) -> None:
        super().__init__("chat", system=system)
        self.shots = list(shots)

    def prompt(self, record: Record, tokenizer: Any = None) -> str:
        def user(r: Record) -> str:
            return r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")

        messages = [{"role": "system", "content": self.system}] if self.system else []
        for s in self.shots:
            messages += [{"role": "user", "content": user(s)}, {"role": "assistant", "content": s["output"]}]
        messages.append({"role": "user", "content": user(record)})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def pick_shots(train: Sequence[Record], k: int, seed: int = 0) -> list[Record]:
    """k training records (seeded), shortest-first among a sample so prompts stay small on a CPU."""
    if k == 0:
        return []
    pool = random.Random(seed).sample(list(train), min(len(train), 8 * k))
    return sorted(pool, key=lambda r: len(r["instruction"]) + len(r["input"]) + len(r["output"]))[:k]


def evaluate_task(model: nn.Module, tokenizer: Any, task: str, records: Sequence[Record], template: Template,
                  *, max_retries: int = 2, seed: int = 0, max_new_tokens: int | None = None,
                  batch_size: int = 16) -> dict[str, Any]:
    """Greedy answers to `records` under `template` (whatever adapter is active), scored for `task`.
    max_new_tokens: None = the task's default (MAX_NEW_TOKENS); prompts run in length-sorted batches."""

    records = list(records)
    if task in ("mcq", "saq"):
        answers = answer_with_retry(model, tokenizer, records, TASKS[task], template, max_retries=max_retries,
                                    seed=seed, batch_size=batch_size)
        return score(task, records, answers) | {"examples": [a.text for a in answers[:5]]}
    gen = GenerationConfig(max_new_tokens or MAX_NEW_TOKENS[task], SamplingConfig(temperature=0.0), seed=seed)
    prompts = [template.prompt(r, tokenizer) for r in records]
    outputs = [o.strip() for o in generate(model, tokenizer, prompts, gen, batch_size=batch_size)]
    out: dict[str, Any] = {"n": len(records), "examples": outputs[:3]}
    if task == "sst2":
        words = [(o.split() or [""])[0].strip(".,!:").lower() for o in outputs]
        out["accuracy"] = sum(w == r["output"] for w, r in zip(words, records)) / max(len(records), 1)
        out["valid"] = sum(w in ("positive", "negative") for w in words) / max(len(records), 1)
    elif task == "summarize":
        out |= rouge(outputs, [r["answers"] for r in records])
    elif task == "math":
        out["exact_match"] = sum(gsm8k_match(o, "#### " + r["answers"][0]) for o, r in zip(outputs, records)) / max(len(records), 1)
        out["has_answer"] = sum(extract_number(o) is not None for o in outputs) / max(len(records), 1)
    return out


def mcq_zero_shot(model: nn.Module, tokenizer: Any, records: Sequence[Record], template: Template,
                  adapters: bool = False) -> dict[str, Any]:
    """Letter log-probability accuracy, overall and per source (mmlu, arc), with every adapter off
    (the zero-shot baseline) or, with `adapters`, through the active one; plus how often each letter
    was picked, since a skewed letter prior is what sinks a small model here."""

    with contextlib.nullcontext() if adapters else disable_lora(model):
        preds = letter_logprob_predict(model, tokenizer, records, template)
    return _mcq_scores(preds, records) | {
        "picked": {ch: preds.count(ch) for ch in sorted(set(preds))},
        "answers": {ch: sum(r["output"] == ch for r in records) for ch in sorted({r["output"] for r in records})}}


def mcq_cloze(model: nn.Module, tokenizer: Any, records: Sequence[Record], precision: Any = None) -> dict[str, Any]:
    """The base model's cloze accuracy (no letters, no adapter): what it knows about these questions,
    roughly what an adapter that only teaches the letter format can bring to the surface. Scored by
    total log-probability of each option (the accuracy and per-item fields) and per character
    (`accuracy_norm`), under `precision` (None = fp32)."""

    with disable_lora(model):
        raw, norm = cloze_predict(model, tokenizer, records, precision=precision)
    return _mcq_scores(raw, records) | {"accuracy_norm": _mcq_scores(norm, records)["accuracy"]}


def _mcq_scores(preds: Sequence[str], records: Sequence[Record]) -> dict[str, Any]:
    return {"n": len(records)} | mcq_accuracy([int(p == r["output"]) for p, r in zip(preds, records)], records)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """One progress line per evaluation stage on stderr (stdout keeps the results): each can take minutes."""
    t0 = time.perf_counter()
    print(f"[eval] {name} ...", file=sys.stderr, flush=True)
    yield
    print(f"[eval] {name}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def evaluate_recipe(recipe: str, overrides: Sequence[str] = (), adapter: str = "", max_retries: int = 2,
                    shots: int = 0) -> dict[str, Any]:
    """Score the base model (and `adapter`, if given) on a recipe's test split, as `lmlab qa eval` does.
    Runs under the recipe's precision (device and autocast dtype), the one its adapter was trained in.
    Each stage reports on stderr as it starts and ends."""

    cfg = load_config(recipe, list(overrides), schema=SFTConfig)
    train, _, test = load_splits(cfg)
    task = TASK_OF_SOURCE.get(cfg.data.source)
    if task is None:
        raise ConfigError(f"{recipe}: data.source={cfg.data.source!r} has no generation metric (alpaca: use perplexity)")
    precision = Precision(resolve_device(cfg.precision.device), cfg.precision.dtype)
    loaded = load_model(cfg.model.spec, device=precision.device, tokenizer=cfg.model.tokenizer or None)
    model, tok = loaded.model, loaded.require_tokenizer("set model.tokenizer=PATH")
    template = make_template(cfg.data)
    results: dict[str, Any] = {"task": task, "n_test": len(test), "dtype": precision.dtype_name}
    n = f"{len(test)} {task} test items"
    with precision.autocast():
        if task == "mcq":
            with stage(f"zero-shot letter log-probabilities, {n}"):
                results["zero_shot_logprob"] = mcq_zero_shot(model, tok, test, template)
            with stage(f"zero-shot cloze, {n}"):
                results["zero_shot_cloze"] = mcq_cloze(model, tok, test, precision=precision)
        prompt = FewShotTemplate(pick_shots(train, shots), cfg.data.system or None) if shots else template
        with stage(f"base model, {shots}-shot generated answers, {n}"):
            results[f"base_{shots}shot"] = evaluate_task(model, tok, task, test, prompt, max_retries=max_retries)
        if adapter:
            load_adapter(model, adapter, name=task)
            if task == "mcq":  # the baseline's scoring with the adapter on: the letter prior it learned
                with stage(f"adapter letter log-probabilities, {n}"):
                    results["adapter_logprob"] = mcq_zero_shot(model, tok, test, template, adapters=True)
            with stage(f"adapter {adapter}, generated answers, {n}"):
                results["adapter"] = evaluate_task(model, tok, task, test, template, max_retries=max_retries)
    return results
