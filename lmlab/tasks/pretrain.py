"""`lmlab run RECIPE.yaml [a.b=c ...]`: build everything a pretraining recipe names, then call `fit`.

setup (config, processes, data, model, optimizer, resume) -> fit (lmlab/train/loop.py) -> write results.
Every run writes one folder: config.yaml (resolved), metrics.jsonl, summary.json, checkpoints/
(step_XXXXXXX/ and best/), samples.txt when the recipe asks for samples. Under torchrun only rank 0
writes files. Later recipe kinds (fine-tuning, DPO) reuse `setup_distributed`, `build_model`,
`make_fit_config` and `finish` and hand `fit` their own loss function and batches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmlab.data.pretrain import Layout, PaddedChunks, RandomWindows, check_length, eval_batches, prepare_data
from lmlab.errors import ConfigError
from lmlab.fileio import atomic_write_text
from lmlab.generation.generate import GenerationConfig, generate_ids
from lmlab.generation.sampling import SamplingConfig
from lmlab.model.config import get_preset
from lmlab.model.transformer import Transformer
from lmlab.precision import Precision, peak_flops, resolve_device
from lmlab.schema.load import check_resume_config, load_config, save_config
from lmlab.schema.pretrain import RunConfig
from lmlab.schema.sections import ModelSection
from lmlab.train.distributed import seed_everything, setup_distributed, wrap_model
from lmlab.train.logger import MetricsLogger
from lmlab.train.loop import FitConfig, FitResult, fit
from lmlab.train.losses import lm_loss
from lmlab.train.optim import build_optimizer
from lmlab.train.schedule import Schedule
from lmlab.train.state import Checkpointer, load_train_state
from lmlab.weights.build import load_state_into
from lmlab.weights.checkpoint import load_checkpoint, model_state


def build_model(section: ModelSection, vocab_size: int | None = None) -> nn.Module:
    """A fresh preset (vocab from the tokenizer unless overridden) or a checkpoint, with overrides."""
    overrides = dict(section.overrides)
    if section.init.startswith("preset:"):
        if vocab_size and section.vocab_from_tokenizer and "vocab_size" not in overrides:
            overrides["vocab_size"] = vocab_size
        return Transformer(get_preset(section.init.removeprefix("preset:"), **overrides))

    model = load_checkpoint(section.init)
    if overrides:
        config = dataclasses.replace(model.config, **overrides)
        fresh = Transformer(config)
        load_state_into(fresh, model_state(model), section.init)
        model = fresh
    if vocab_size and model.config.vocab_size < vocab_size:
        raise ConfigError(
            f"model.init={section.init}: vocab_size {model.config.vocab_size} is smaller than the tokenizer's {vocab_size}"
        )
    return model


def make_fit_config(cfg: RunConfig, max_steps: int, flops_per_token: float, peak_flops: float, is_main: bool) -> FitConfig:
    return FitConfig(
        max_steps=max_steps, grad_accum=cfg.train.grad_accum, grad_clip=cfg.train.grad_clip,
        eval_every=cfg.train.eval_every, log_every=cfg.logging.log_every, checkpoint_every=cfg.checkpoint.every,
        keep_best=cfg.checkpoint.best, progress_bar=cfg.logging.progress and is_main,
        flops_per_token=flops_per_token, peak_flops=peak_flops,
    )


def run_recipe(path: str | Path | None, overrides: list[str] = ()) -> Path:
    """Run one recipe; returns its run folder."""
    cfg = load_config(path, list(overrides))
    return run_config(cfg)


def run_config(cfg: RunConfig) -> Path:
    t0 = time.perf_counter()
    dist, device_name = setup_distributed(cfg.precision.device, cfg.distributed.backend)
    precision = Precision(resolve_device(device_name), cfg.precision.dtype)  # rejects bad combos first
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out = Path(cfg.out_dir)
    seed_everything(cfg.train.seed)

    # data: rank 0 tokenizes into the cache, the others wait and read it
    if not cfg.data.path:
        raise ConfigError("data.path is empty: set the corpus file (e.g. data.path=${data_dir}/tinyshakespeare/input.txt)")
    for turn in ([0, 1] if dist.world > 1 else [0]):
        if (dist.rank == 0) == (turn == 0):
            tokenizer, train_split, val_split = prepare_data(cfg.data)
        if dist.world > 1:
            torch.distributed.barrier()
    d = cfg.data

    model = build_model(cfg.model, tokenizer.vocab_size)
    seq_len = d.seq_len or model.config.max_seq_len
    if seq_len > model.config.max_seq_len:
        raise ConfigError(f"data.seq_len={seq_len} is longer than model.max_seq_len={model.config.max_seq_len}")
    check_length(train_split, seq_len, "train", d.path)
    if d.sampling == "random":
        check_length(val_split, seq_len, "validation", d.val_path or d.path)
    model.to(precision.device)
    raw_model, model = model, wrap_model(model, dist, cfg.distributed.strategy, cfg.precision.compile)
    o = cfg.optim  # after wrapping: FSDP replaces the parameters with sharded ones
    optimizer = build_optimizer(raw_model, o.impl, o.lr, tuple(o.betas), o.eps, o.weight_decay, o.decay_embeddings)

    layout = Layout(cfg.train.batch_size, cfg.train.grad_accum, dist.rank, dist.world)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    if d.sampling == "random":
        train_data = RandomWindows(train_split, seq_len, layout, cfg.train.seed)
    else:
        train_data = PaddedChunks(train_split, seq_len, layout, cfg.train.seed, pad_id)
    val_data = eval_batches(val_split, seq_len, cfg.train.batch_size, d.sampling, pad_id=pad_id,
                            max_batches=d.val_batches, rank=dist.rank, world=dist.world)
    max_steps = _max_steps(cfg, train_data, layout, len(train_split), seq_len)

    checkpointer = Checkpointer(out / "checkpoints", tokenizer, cfg.checkpoint.keep_last, dist.is_main)
    progress, latest = None, checkpointer.latest() if cfg.checkpoint.resume else None
    if latest is not None:
        check_resume_config(out, cfg)
        progress = load_train_state(latest, model, optimizer, precision.scaler, dist.rank)
        if progress.step >= max_steps and (out / "summary.json").is_file():
            if dist.is_main:
                print(f"{out}: already finished ({progress.step} steps); nothing to do")
            return out
        if dist.is_main:
            print(f"resuming from {latest} (step {progress.step})")
    logger = MetricsLogger(out / "metrics.jsonl" if dist.is_main else None,
                           out / "tb" if cfg.logging.tensorboard and dist.is_main else None,
                           resume_step=progress.step if progress else None)
    if dist.is_main:
        save_config(cfg, out / "config.yaml")
    peak = cfg.logging.peak_tflops * 1e12 or peak_flops(precision.device, cfg.precision.dtype)
    s = cfg.schedule
    schedule = Schedule(o.lr, s.warmup_steps, s.decay_steps or max_steps, s.min_lr, s.kind)
    fit_cfg = make_fit_config(cfg, max_steps, raw_model.flops_per_token(seq_len), peak, dist.is_main)
    try:
        result = fit(model, lm_loss, train_data, optimizer, schedule, fit_cfg, precision, val_data=val_data,
                     logger=logger, checkpointer=checkpointer, progress=progress)
    finally:
        logger.close()
    if dist.is_main:
        finish(cfg, out, raw_model, tokenizer, result, time.perf_counter() - t0)
    if dist.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return out


def _max_steps(cfg: RunConfig, train_data: Any, layout: Any, n_tokens: int, seq_len: int) -> int:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    if cfg.train.epochs <= 0:
        raise ConfigError("set train.max_steps or train.epochs (both are 0)")
    per_epoch = getattr(train_data, "steps_per_epoch", None) or math.ceil(n_tokens / (seq_len * layout.global_batch))
    return max(1, math.ceil(cfg.train.epochs * per_epoch))


def finish(cfg: RunConfig, out: Path, model: nn.Module, tokenizer: Any, result: FitResult, wall_s: float) -> None:
    """summary.json (+ samples.txt), and one printed line with the result and the time it took."""
    p = result.progress
    summary = dict(
        val_loss=result.val_loss, val_ppl=math.exp(result.val_loss) if result.val_loss is not None else None,
        best_val_loss=p.best_val_loss if math.isfinite(p.best_val_loss) else None,
        train_loss=result.train_loss, train_ppl=math.exp(min(result.train_loss, 50)), steps=p.step,
        tokens_seen=p.tokens_seen, train_time_s=p.elapsed_s, wall_time_s=wall_s,
        tokens_per_s=p.tokens_seen / max(p.elapsed_s, 1e-9), n_params=model.num_params(),
        peak_mem_mb=result.peak_mem_mb, model=model.config.name, out_dir=str(out),
    )
    if cfg.sample.prompts:
        text = sample_text(model, tokenizer, cfg)
        atomic_write_text(out / "samples.txt", text)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    val = f"val_loss {result.val_loss:.4f} (ppl {summary['val_ppl']:.2f}), " if result.val_loss is not None else ""
    print(f"{out}: {val}train_loss {result.train_loss:.4f}, {p.step} steps in {p.elapsed_s:.1f} s "
          f"(wall {wall_s:.1f} s, {summary['tokens_per_s']:,.0f} tokens/s)")


def sample_text(model: nn.Module, tokenizer: Any, cfg: RunConfig) -> str:
    """Continue each prompt of `cfg.sample` (seeded); returns the text written to samples.txt."""
    s = cfg.sample
    gen = GenerationConfig(
        max_new_tokens=s.max_new_tokens, seed=cfg.train.seed,
        sampling=SamplingConfig(temperature=s.temperature, top_k=s.top_k or None),
        stop_ids=tuple(sorted(tokenizer.stop_ids)),
    )
    bos = tokenizer.bos_id is not None and (tokenizer.add_bos or cfg.data.add_bos)
    prompts = [tokenizer.encode(p, bos=bos) or [tokenizer.bos_id or 0] for p in s.prompts]
    outputs = generate_ids(model, prompts, gen)
    # decode prompt + continuation together: a continuation alone loses its leading space in SentencePiece
    blocks = [f"### {p!r}\n{tokenizer.decode(list(ids_in) + ids)}\n" for p, ids_in, ids in zip(s.prompts, prompts, outputs)]
    return "\n".join(blocks)
