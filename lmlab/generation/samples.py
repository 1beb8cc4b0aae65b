"""K sampled texts per prompt (best-of-N, verifier training data): each prompt is prefilled once and its
KV cache shared by its K samples (`generate_ids(num_samples=K)`), and sample k of prompt i draws from its
own generator seeded `seeds[i][k]`, so its text is what that prompt alone gives with that seed, whatever
else shares the batch. Prompts run in length-sorted batches of `batch_prompts` (K rows each).
"""

from __future__ import annotations

from collections.abc import Sequence

from lmlab.generation.generate import GenerationConfig, cut_at_stop, generate_ids, length_batches
from lmlab.model.transformer import Transformer

STOP_WINDOW = 16
"""Tokens decoded at each step to spot a stop string (stop strings are a few tokens long)."""


def sample_texts(model: Transformer, tokenizer, prompts: Sequence[Sequence[int]], cfg: GenerationConfig, k: int,
                 seeds: Sequence[Sequence[int]], *, batch_prompts: int = 4) -> list[list[str]]:
    """K texts for each encoded prompt (stop ids and stop strings excluded), in the prompts' order."""
    if len(seeds) != len(prompts) or any(len(s) != k for s in seeds):
        raise ValueError(f"seeds: expected {k} seeds for each of {len(prompts)} prompts")
    cfg = GenerationConfig(cfg.max_new_tokens, cfg.sampling, tuple(set(cfg.stop_ids) | set(tokenizer.stop_ids)),
                           tuple(cfg.stop_strings), cfg.seed)
    should_stop = None
    if cfg.stop_strings:
        def should_stop(_row: int, new_ids: list[int]) -> bool:
            return cut_at_stop(tokenizer.decode(new_ids[-STOP_WINDOW:]), cfg.stop_strings)[1]
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    out: list[list[str]] = [[] for _ in prompts]
    for rows in length_batches([len(p) for p in prompts], batch_prompts):
        new = generate_ids(model, [prompts[i] for i in rows], cfg, pad_id=pad, should_stop=should_stop,
                           num_samples=k, row_seeds=[s for i in rows for s in seeds[i]])
        for j, i in enumerate(rows):
            out[i] = [cut_at_stop(tokenizer.decode(ids), cfg.stop_strings)[0] for ids in new[j * k : (j + 1) * k]]
    return out
