"""Supervised instruction fine-tuning with LoRA (`lmlab sft RECIPE.yaml [a.b=c ...]`), seed 000's recipe.

The setup: records -> seeded 5:1:1 split -> response-masked examples; the model with a LoRA adapter; the
objective `lm_loss` on prompt-masked labels (only the response tokens count; it projects to the
vocabulary only there). The training session (lmlab/train/session.py) trains; around it: perplexity
before and after, samples for novel instructions, the adapter saved (lmlab + peft format) by name.
QA, summarization and math adapters are this same path with another `data.source` (recipes/qa/...).

Run folder: config.yaml, metrics.jsonl, summary.json (perplexities, time, peak memory, data counts),
samples.md, checkpoints/ (adapter-only), adapters/<name>/ (lmlab) and adapters/<name>-peft/ (peft).
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.adapters.files import export_peft, peft_unsupported, save_adapter
from lmlab.adapters.lora import apply_lora
from lmlab.data import qa, tasks
from lmlab.data.batch import IGNORE_INDEX, pad_id_of
from lmlab.data.instruct import (
    Example,
    InstructBatches,
    Record,
    Template,
    check_record,
    encode_examples,
    example_eval_batches,
    read_alpaca,
    split_records,
)
from lmlab.data.qa import permute_options
from lmlab.errors import ConfigError, DataError
from lmlab.fileio import atomic_write_text
from lmlab.generation.generate import GenerationConfig, generate
from lmlab.precision import Precision
from lmlab.schema.sft import InstructDataSection, SFTConfig, SFTEvalSection
from lmlab.train.losses import lm_loss
from lmlab.train.session import Session
from lmlab.weights.loading import load_model

# ----------------------------------------------------------------------------------------------------
# loss and perplexity


@torch.no_grad()
def perplexities(model: nn.Module, examples: list[Example], pad_id: int, batch_size: int,
                 precision: Precision) -> dict[str, float]:
    """Plain (every token after the first) and conditional (response tokens | prompt) perplexity,
    token-weighted, from one forward pass per batch."""
    was_training = model.training
    model.eval()
    sums = {"plain": [0.0, 0], "conditional": [0.0, 0]}
    for batch in example_eval_batches(examples, batch_size, pad_id, full=True):
        ids, labels = batch["input_ids"].to(precision.device), batch["labels"].to(precision.device)
        with precision.autocast():
            logits = model(ids)
        nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                              reduction="none").view_as(labels)
        is_resp = batch["response_mask"].to(precision.device)
        sums["plain"][0] += float(nll.sum())
        sums["plain"][1] += int((labels != IGNORE_INDEX).sum())
        sums["conditional"][0] += float(nll[is_resp].sum())
        sums["conditional"][1] += int(is_resp.sum())
    model.train(was_training)
    return {f"{k}_ppl": math.exp(s / max(n, 1)) for k, (s, n) in sums.items()} | \
        {f"{k}_tokens": n for k, (_, n) in sums.items()}


# ----------------------------------------------------------------------------------------------------
# data


def read_records(source: str, paths: list[str]) -> list[Record]:
    """Records of every file, pooled; the reader is chosen by `data.source`. Every file must hold at least
    one record, and every record string instruction/input/output fields (whatever its reader)."""
    readers = {"alpaca": read_alpaca, "mcq": qa.mcq_records, "saq": qa.saq_records,
               "dialogsum": tasks.dialogsum_records, "gsm8k": tasks.gsm8k_records, "sst2": tasks.sst2_records}
    if source not in readers:
        raise ConfigError(f"data.source={source!r}: expected one of {list(readers)}")
    if not paths:
        raise ConfigError("data.paths is empty: name the data file(s), e.g. data.paths=[${data_dir}/alpaca/alpaca_small.json]")
    out = []
    for path in paths:
        records = readers[source](path)
        if not records:
            raise DataError(f"{path}: no records (the file is empty); expected {source} data")
        out += [check_record(r, f"{path}: record {i}") for i, r in enumerate(records)]
    return out


def make_template(d: InstructDataSection) -> Template:
    return Template(d.template, d.custom_template, d.response_marker, d.system or None)


def load_splits(cfg: SFTConfig) -> tuple[list[Record], list[Record], list[Record]]:
    """The seeded split, with the CPU-size caps applied after it (so the test set never moves). A separate
    test file is shuffled with the same seed, so a capped test set is a random sample, not the file's head
    (SST's dev file, for one, is grouped by label: its first 100 sentences are 96 positive)."""
    d = cfg.data
    train, val, test = split_records(read_records(d.source, d.paths), tuple(d.split), d.split_seed, d.subset)
    if d.test_paths:
        (test,) = split_records(read_records(d.source, d.test_paths), (1,), d.split_seed)
    cap = lambda rs, n: rs[:n] if n else rs  # noqa: E731
    train = cap(train, d.max_train)
    if d.permute_options > 1:
        if d.source != "mcq":
            raise ConfigError(f"data.permute_options={d.permute_options}: only for data.source=mcq (got {d.source!r})")
        train = permute_options(train, d.permute_options, d.split_seed)
    return train, cap(val, d.max_eval), cap(test, d.max_eval)


# ----------------------------------------------------------------------------------------------------
# the run


def run_sft(cfg: SFTConfig) -> dict[str, Any]:
    """Train one adapter; returns the summary (also written to summary.json)."""
    name = cfg.adapter or cfg.data.source
    with Session(cfg) as session:
        loaded = load_model(cfg.model.spec, device=session.device, tokenizer=cfg.model.tokenizer or None,
                            overrides=cfg.model.overrides)
        model, tok = loaded.model, loaded.require_tokenizer("set model.tokenizer=PATH")
        pad_id, template = pad_id_of(tok), make_template(cfg.data)
        splits = dict(zip(("train", "val", "test"), load_splits(cfg)))
        data = {k: encode_examples(v, template, tok, cfg.data.max_len) for k, v in splits.items()}
        if not data["train"].examples:
            raise ConfigError(f"data.paths={cfg.data.paths}: no training example left after the split and the "
                              f"caps ({data['train'].summary()})")
        t, e = cfg.train, cfg.eval
        batches = InstructBatches(data["train"].examples, t.batch_size, t.grad_accum, t.seed, pad_id,
                                  cfg.data.packing, cfg.data.max_len)
        max_steps = session.max_steps(batches.steps_per_epoch)
        if session.finished(max_steps):
            return json_summary(session)
        summary: dict[str, Any] = {"adapter": name, "data": {k: v.summary() for k, v in data.items()}}
        no_peft = peft_unsupported(model) if cfg.export_peft else None
        if no_peft:  # said before training, so the run still ends with its adapter and summary
            print(f"note: export_peft skipped: {no_peft}; the adapter is saved in lmlab's format only")
        test = data["test"].examples
        if e.perplexity and test:
            summary["before"] = perplexities(model, test, pad_id, e.batch_size, session.precision)
            print(f"before: {summary['before']}")
        apply_lora(model, cfg.lora, name=name)
        result = session.fit(model, lm_loss, batches, max_steps=max_steps, steps_per_epoch=batches.steps_per_epoch,
                             val_data=example_eval_batches(data["val"].examples, e.batch_size, pad_id),
                             trainable_only=True, flops_per_token=model.flops_per_token(cfg.data.max_len))
        summary["train"] = session.summary(model, result, examples=len(data["train"].examples))
        if e.perplexity and test:
            summary["after"] = perplexities(model, test, pad_id, e.batch_size, session.precision)
            print(f"after: {summary['after']}")
        if e.instructions:
            samples = sample_instructions(model, tok, template, e, cfg.train.seed)
            atomic_write_text(session.out / "samples.md", "".join(f"### {q}\n\n{a}\n\n" for q, a in samples))
            summary["samples"] = dict(samples)
        save_adapter(model, session.out / "adapters" / name)
        if cfg.export_peft:
            summary["peft"] = f"skipped: {no_peft}" if no_peft else \
                str(export_peft(model, session.out / "adapters" / f"{name}-peft"))
        return session.finish(summary, line=_line(session, summary))


def json_summary(session: Session) -> dict[str, Any]:
    """The summary an earlier, finished run wrote."""
    return json.loads((session.out / "summary.json").read_text())


def _line(session: Session, s: dict[str, Any]) -> str:
    ppl = (f", conditional ppl {s['before']['conditional_ppl']:.2f} -> {s['after']['conditional_ppl']:.2f}"
           if "before" in s and "after" in s else "")
    tr = s["train"]
    return (f"{session.out}: adapter {s['adapter']}: train_loss {tr['train_loss']:.4f}"
            + (f", val_loss {tr['val_loss']:.4f}" if tr.get("val_loss") is not None else "")
            + f"{ppl}, {tr['steps']} steps in {tr['train_time_s']:.1f} s")


def sample_instructions(model: nn.Module, tokenizer: Any, template: Template, e: SFTEvalSection,
                        seed: int) -> list[tuple[str, str]]:
    """Answers to the novel instructions, sampled through the one generation path."""
    prompts = [template.prompt({"instruction": q, "input": "", "output": ""}, tokenizer) for q in e.instructions]
    gen = GenerationConfig(e.max_new_tokens, e.sampling(), stop_strings=("### Instruction:",), seed=seed)
    answers = generate(model, tokenizer, prompts, gen)
    return [(q, a.strip()) for q, a in zip(e.instructions, answers)]
