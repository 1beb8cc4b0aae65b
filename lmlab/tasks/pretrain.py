"""`lmlab run RECIPE.yaml [a.b=c ...]`: pretraining (or continued pretraining) with the language-model loss.

The setup is the corpus (documents -> tokenizer -> cached token shards -> seeded batch sources) and the
model (a preset with the tokenizer's vocabulary, or any loadable model); the training session
(lmlab/train/session.py) does the rest. Every run writes one folder: config.yaml (resolved),
metrics.jsonl, summary.json, checkpoints/ (step_XXXXXXX/ and best/), samples.txt when the recipe asks
for samples. Under torchrun only rank 0 writes files.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import nn

from lmlab.data.batch import pad_id_of
from lmlab.data.pretrain import Layout, PaddedChunks, RandomWindows, check_length, prepare_data, token_eval_batches
from lmlab.errors import ConfigError
from lmlab.fileio import atomic_write_text
from lmlab.generation.generate import GenerationConfig, generate_ids
from lmlab.model.transformer import unwrap
from lmlab.schema.pretrain import PretrainConfig
from lmlab.train.losses import lm_loss
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
