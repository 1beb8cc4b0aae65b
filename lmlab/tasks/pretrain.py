"""`lmlab run RECIPE.yaml [a.b=c ...]`: pretraining (or continued pretraining) with the language-model loss.

The setup is the corpus (documents -> tokenizer -> cached token shards -> seeded batch sources) and the
model (a preset with the tokenizer's vocabulary, or any loadable model); the training session
(lmlab/train/session.py) does the rest. Every run writes one folder: config.yaml (resolved),
metrics.jsonl, summary.json, checkpoints/ (step_XXXXXXX/ and best/), samples.txt when the recipe asks
for samples. Under torchrun only rank 0 writes files.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmlab.data.batch import pad_id_of
from lmlab.data.corpus import read_documents
from lmlab.data.pretrain import (
    Layout,
    PaddedChunks,
    RandomWindows,
    build_tokenizer,
    check_length,
    prepare_data,
    token_eval_batches,
)
from lmlab.errors import ConfigError
from lmlab.fileio import atomic_write_text
from lmlab.generation.generate import GenerationConfig, generate_ids
from lmlab.model.attention import MATH_ATTENTION_MAX_SCORES
from lmlab.model.config import ModelConfig, get_preset
from lmlab.model.transformer import unwrap
from lmlab.precision import auto_dtype_name, resolve_device
from lmlab.schema.pretrain import PretrainConfig
from lmlab.train.losses import lm_loss
from lmlab.train.memory import GIB, estimate_training_memory, report, total_params
from lmlab.train.session import Session
from lmlab.weights.loading import load_model


def run_pretrain(cfg: PretrainConfig) -> Path:
    """Run one pretraining recipe; returns its run folder."""
    if not cfg.data.path:
        raise ConfigError("data.path is empty: set the corpus file (e.g. data.path=${data_dir}/tinyshakespeare/input.txt)")
    with Session(cfg, distributed=cfg.distributed) as session:
        d, dist = cfg.data, session.dist
        tokenizer, train_split, val_split = session.main_first(lambda: prepare_data(d))  # rank 0 fills the cache
        vocab = tokenizer.vocab_size if cfg.model.vocab_from_tokenizer else None
        model = load_model(cfg.model.spec, device=session.device, overrides=cfg.model.overrides, vocab_size=vocab).model
        if model.config.vocab_size < tokenizer.vocab_size:  # ids past the embedding table would crash in it
            raise ConfigError(f"model.vocab_size={model.config.vocab_size} is smaller than the tokenizer's "
                              f"{tokenizer.vocab_size} ids (data.tokenizer={d.tokenizer}); raise it or set "
                              "model.vocab_from_tokenizer=true")
        seq_len = d.seq_len or model.config.max_seq_len
        if seq_len > model.config.max_seq_len:
            raise ConfigError(f"data.seq_len={seq_len} is longer than model.max_seq_len={model.config.max_seq_len}")
        check_length(train_split, seq_len, "train", d.path)
        if d.sampling == "random":
            check_length(val_split, seq_len, "validation", d.val_path or d.path)
        layout = Layout(cfg.train.batch_size, cfg.train.grad_accum, dist.rank, dist.world)
        pad_id = pad_id_of(tokenizer)
        if d.sampling == "random":
            train_data: Any = RandomWindows(train_split, seq_len, layout, cfg.train.seed)
            per_epoch = math.ceil(len(train_split) / (seq_len * layout.global_batch))
        else:
            train_data = PaddedChunks(train_split, seq_len, layout, cfg.train.seed, pad_id)
            per_epoch = train_data.steps_per_epoch
        val_data = token_eval_batches(val_split, seq_len, cfg.train.batch_size, d.sampling, pad_id=pad_id,
                                      max_batches=d.val_batches, rank=dist.rank, world=dist.world)
        max_steps = session.max_steps(per_epoch)
        if session.finished(max_steps):
            return session.out
        result = session.fit(model, lm_loss, train_data, max_steps=max_steps, steps_per_epoch=per_epoch,
                             val_data=val_data, flops_per_token=model.flops_per_token(seq_len), tokenizer=tokenizer)
        if session.is_main:
            if cfg.sample.prompts:
                atomic_write_text(session.out / "samples.txt", sample_text(model, tokenizer, cfg))
            summary = session.summary(model, result, model=model.config.name,
                                      best_val_loss=result.progress.best_metric)
            session.finish(summary)
        return session.out


def sample_text(model: nn.Module, tokenizer: Any, cfg: PretrainConfig) -> str:
    """Continue each prompt of `cfg.sample` (seeded); returns the text written to samples.txt."""
    s = cfg.sample
    gen = GenerationConfig(max_new_tokens=s.max_new_tokens, seed=cfg.train.seed, sampling=s.sampling(),
                           stop_ids=tuple(sorted(tokenizer.stop_ids)))
    bos = tokenizer.bos_id is not None and (tokenizer.add_bos or cfg.data.add_bos)
    prompts = [tokenizer.encode(p, bos=bos) or [tokenizer.bos_id or 0] for p in s.prompts]
    outputs = generate_ids(unwrap(model), prompts, gen)
    # decode prompt + continuation together: a continuation alone loses its leading space in SentencePiece
    blocks = [f"### {p!r}\n{tokenizer.decode(list(ids_in) + ids)}\n" for p, ids_in, ids in zip(s.prompts, prompts, outputs)]
    return "\n".join(blocks)


# ----------------------------------------------------------------------------------------------------
# dry run


def model_config(cfg: PretrainConfig) -> ModelConfig:
    """The config of the model a recipe would train, without building it: a preset with the tokenizer's
    vocabulary (a `char` tokenizer reads the corpus for it), or a loaded model's own."""
    m, d = cfg.model, cfg.data
    if not m.spec.startswith("preset:"):
        return load_model(m.spec, overrides=m.overrides).model.config
    overrides = dict(m.overrides)
    if m.vocab_from_tokenizer and "vocab_size" not in overrides:
        docs = read_documents(d.path, field=d.field, column=d.column, separator=d.doc_separator,
                              hf_split=d.hf_split)[0] if d.tokenizer == "char" else []
        overrides["vocab_size"] = build_tokenizer(d.tokenizer, docs)[0].vocab_size
    return get_preset(m.spec.removeprefix("preset:"), **overrides)


def device_memory(device: torch.device) -> tuple[float, str]:
    """Total memory of `device` in bytes, and where the number came from."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("precision.device is CUDA, which this machine does not have: give the card's "
                              "memory with --device-memory GB")
        props = torch.cuda.get_device_properties(device)
        return float(props.total_memory), props.name
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "this machine's RAM"


def dry_run(cfg: PretrainConfig, memory_gb: float = 0.0) -> str:
    """What `lmlab run RECIPE --dry-run` prints: the model's size, the step's tokens, the memory estimate
    of lmlab.train.memory at the recipe's micro-batch, and whether it fits `memory_gb` (0 = the recipe's
    device's memory)."""
    c, t = model_config(cfg), cfg.train
    seq_len = cfg.data.seq_len or c.max_seq_len
    dev = cfg.precision.device  # the recipe's device, even where this machine has none
    device = resolve_device(dev) if dev == "auto" else torch.device(dev)
    math_attention = device.type == "cpu" and t.batch_size * c.n_heads * seq_len**2 <= MATH_ATTENTION_MAX_SCORES
    dtype = auto_dtype_name(device) if cfg.precision.dtype == "auto" else cfg.precision.dtype
    est = estimate_training_memory(c, t.batch_size, seq_len, dtype, math_attention=math_attention)
    n = total_params(c)
    embed = c.vocab_size * c.dim + (c.max_seq_len * c.dim if c.pos == "learned" else 0)
    budget, where = (memory_gb * GIB, f"--device-memory {memory_gb:g}") if memory_gb else device_memory(device)
    return "\n".join([
        f"{cfg.model.spec}: dim {c.dim}, {c.n_layers} layers, {c.n_heads} heads ({c.n_kv_heads} kv), "
        f"FFN {c.hidden_dim} ({c.mlp}), {c.norm}, context {c.max_seq_len}, vocab {c.vocab_size:,}"
        + (f", {c.sink_tokens} sink tokens" if c.sink_tokens else ""),
        f"parameters: {n:,} ({n - embed:,} without embeddings), all trained",
        (f"step: micro-batch {t.batch_size} x {seq_len} tokens, grad_accum {t.grad_accum} -> "
         f"{t.batch_size * seq_len * t.grad_accum:,} tokens per optimizer step"),
        (f"memory estimate ({dtype} autocast on {device.type}, "
         f"{'math' if math_attention else 'fused'} attention; lmlab/train/memory.py):"),
        report(est, budget, where),
    ])
