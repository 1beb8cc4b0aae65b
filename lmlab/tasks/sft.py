"""Supervised instruction fine-tuning with LoRA (`lmlab sft RECIPE.yaml [a.b=c ...]`), seed 000's recipe.

setup (config, model, records -> seeded 5:1:1 split -> response-masked examples) -> perplexity before
-> LoRA -> `fit` (lmlab/train/loop.py, the one loop) with `lm_loss` on prompt-masked labels (only the
response tokens count; lm_loss projects to the vocabulary only there) -> perplexity after ->
samples for novel instructions -> adapter saved (lmlab + peft format) under the run folder by name.
QA, summarization and math adapters are this same path with another `data.source` (recipes/qa/...).

Run folder: config.yaml, metrics.jsonl, summary.json (perplexities, time, peak memory, data counts),
samples.md, adapters/<name>/ (lmlab) and adapters/<name>-peft/ (peft's adapter_model.safetensors).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.adapters.files import export_peft, save_adapter
from lmlab.adapters.lora import apply_lora
from lmlab.data import qa, tasks
from lmlab.data.batch import IGNORE_INDEX
from lmlab.data.instruct import (
    Example,
    InstructBatches,
    Record,
    Template,
    encode_examples,
    eval_batches,
    read_alpaca,
    split_records,
)
from lmlab.data.qa import permute_options
from lmlab.errors import ConfigError
from lmlab.fileio import atomic_write_text
from lmlab.generation.generate import GenerationConfig, generate
from lmlab.generation.sampling import SamplingConfig
from lmlab.precision import Precision, peak_flops, resolve_device
from lmlab.schema.load import check_resume_config, load_config, save_config
from lmlab.schema.sft import InstructDataSection, SFTConfig, SFTEvalSection
from lmlab.train.distributed import seed_everything
from lmlab.train.logger import MetricsLogger
from lmlab.train.loop import FitConfig, fit
from lmlab.train.losses import lm_loss
from lmlab.train.optim import build_optimizer
from lmlab.train.schedule import Schedule
from lmlab.train.state import Checkpointer, load_train_state
from lmlab.weights.loading import load_model

# ----------------------------------------------------------------------------------------------------
# loss and perplexity


@torch.no_grad()
def perplexities(model: nn.Module, examples: list[Example], pad_id: int, batch_size: int,
                 precision: Any) -> dict[str, float]:
    """Plain (every token after the first) and conditional (response tokens | prompt) perplexity,
    token-weighted, from one forward pass per batch."""
    was_training = model.training
    model.eval()
    sums = {"plain": [0.0, 0], "conditional": [0.0, 0]}
    for batch in eval_batches(examples, batch_size, pad_id, full=True):
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
    """Records of every file, pooled; the reader is chosen by `data.source`."""
    readers = {"alpaca": read_alpaca, "mcq": qa.mcq_records, "saq": qa.saq_records,
               "dialogsum": tasks.dialogsum_records, "gsm8k": tasks.gsm8k_records, "sst2": tasks.sst2_records}
    if source not in readers:
        raise ConfigError(f"data.source={source!r}: expected one of {list(readers)}")
    if not paths:
        raise ConfigError("data.paths is empty: name the data file(s), e.g. data.paths=[${data_dir}/alpaca/alpaca_small.json]")
    return [r for p in paths for r in readers[source](p)]


def make_template(d: InstructDataSection) -> Template:
    return Template(d.template, d.custom_template, d.response_marker, d.system or None)


def load_splits(cfg: SFTConfig) -> tuple[list[Record], list[Record], list[Record]]:
    """The seeded split, with the CPU-size caps applied after it (so the test set never moves). A separate
    test file is shuffled with the same seed, so a capped test set is a random sample, not the file's head
    (SST's dev file, for one, is grouped by label: its first 100 sentences are 96 positive)."""
    d = cfg.data
    if len(d.split) != 3:
        raise ConfigError(f"data.split={d.split}: expected three ratios [train, validation, test]")
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
    t0 = time.perf_counter()
    out, name = Path(cfg.out_dir), cfg.adapter or cfg.data.source
    precision = Precision(resolve_device(cfg.precision.device), cfg.precision.dtype)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    loaded = load_model(cfg.model.spec, device=precision.device, tokenizer=cfg.model.tokenizer or None)
    model, tok = loaded.model, loaded.tokenizer
    pad_id = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    template = make_template(cfg.data)
    splits = dict(zip(("train", "val", "test"), load_splits(cfg)))
    data = {k: encode_examples(v, template, tok, cfg.data.max_len) for k, v in splits.items()}
    summary: dict[str, Any] = {"adapter": name, "data": {k: v.summary() for k, v in data.items()}}
    if cfg.checkpoint.resume and Checkpointer(out / "checkpoints").latest() is not None:
        check_resume_config(out, cfg)  # before config.yaml is replaced by this run's
    save_config(cfg, out / "config.yaml")

    e = cfg.eval
    if e.perplexity and data["test"].examples:
        summary["before"] = perplexities(model, data["test"].examples, pad_id, e.batch_size, precision)
        print(f"before: {summary['before']}")
    apply_lora(model, cfg.lora, name=name)
    summary["train"] = train_adapter(cfg, model, data["train"].examples, data["val"].examples, pad_id, precision, out)
    if e.perplexity and data["test"].examples:
        summary["after"] = perplexities(model, data["test"].examples, pad_id, e.batch_size, precision)
        print(f"after: {summary['after']}")
    if e.instructions:
        samples = sample_instructions(model, tok, template, e, cfg.train.seed)
        atomic_write_text(out / "samples.md", "".join(f"### {q}\n\n{a}\n\n" for q, a in samples))
        summary["samples"] = dict(samples)
    save_adapter(model, out / "adapters" / name)
    if cfg.export_peft:
        export_peft(model, out / "adapters" / f"{name}-peft")
    summary["wall_time_s"] = time.perf_counter() - t0
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def train_adapter(cfg: SFTConfig, model: nn.Module, train: list[Example], val: list[Example], pad_id: int,
                  precision: Any, out: Path) -> dict[str, Any]:
    """The active adapter trained by `fit` with the response-only loss; returns time, memory, losses."""

    t, o, s, lg = cfg.train, cfg.optim, cfg.schedule, cfg.logging
    batches = InstructBatches(train, t.batch_size, t.grad_accum, t.seed, pad_id, cfg.data.packing, cfg.data.max_len)
    max_steps = t.max_steps or max(1, math.ceil(t.epochs * batches.steps_per_epoch))
    optimizer = build_optimizer(model, o.impl, o.lr, tuple(o.betas), o.eps, o.weight_decay, o.decay_embeddings)
    schedule = Schedule(o.lr, s.warmup_steps, s.decay_steps or max_steps, s.min_lr, s.kind)
    fit_cfg = FitConfig(max_steps=max_steps, grad_accum=t.grad_accum, grad_clip=t.grad_clip, eval_every=t.eval_every,
                        log_every=lg.log_every, keep_best=False, progress_bar=lg.progress,
                        checkpoint_every=cfg.checkpoint.every,
                        flops_per_token=model.flops_per_token(cfg.data.max_len),
                        peak_flops=lg.peak_tflops * 1e12 or peak_flops(precision.device, cfg.precision.dtype))
    checkpointer = Checkpointer(out / "checkpoints", keep_last=cfg.checkpoint.keep_last, trainable_only=True)
    progress, latest = None, checkpointer.latest() if cfg.checkpoint.resume else None
    if latest is not None:  # the batches are a function of the step: resuming replays the same data order
        progress = load_train_state(latest, model, optimizer, precision.scaler)
        print(f"resuming from {latest} (step {progress.step} of {max_steps})")
    logger = MetricsLogger(out / "metrics.jsonl", out / "tb" if lg.tensorboard else None,
                           resume_step=progress.step if progress else None)
    model.train()
    trained = torch.compile(model) if cfg.precision.compile else model  # adapters are saved from `model`
    try:
        result = fit(trained, lm_loss, batches, optimizer, schedule, fit_cfg, precision,
                     val_data=eval_batches(val, cfg.eval.batch_size, pad_id), logger=logger,
                     checkpointer=checkpointer, progress=progress)
    finally:
        logger.close()
    return {"steps": max_steps, "train_loss": result.train_loss, "val_loss": result.val_loss,
            "train_time_s": result.progress.elapsed_s, "peak_mem_mb": result.peak_mem_mb,
            "tokens_seen": result.progress.tokens_seen, "examples": len(train)}


def sample_instructions(model: nn.Module, tokenizer: Any, template: Template, e: SFTEvalSection,
                        seed: int) -> list[tuple[str, str]]:
    """Answers to the novel instructions, sampled through the one generation path."""

    prompts = [template.prompt({"instruction": q, "input": "", "output": ""}, tokenizer) for q in e.instructions]
    gen = GenerationConfig(e.max_new_tokens, SamplingConfig(temperature=e.temperature, top_p=e.top_p),
                           stop_strings=("### Instruction:",), seed=seed)
    answers = generate(model, tokenizer, prompts, gen)
    return [(q, a.strip()) for q, a in zip(e.instructions, answers)]


def run_recipe(path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:
    return run_sft(load_config(path, list(overrides), schema=SFTConfig))
