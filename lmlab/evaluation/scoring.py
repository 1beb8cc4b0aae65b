"""Scoring with a decoder: class logits of a sequence head, and log-probabilities of continuations
(zero-shot classification by label log-probability, MCQ cloze and letter scoring). Batches are
length-sorted and right-padded, so hundreds of prompts pad little; results come back in input order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from lmlab.data.batch import right_pad
from lmlab.errors import ConfigError
from lmlab.generation.generate import length_batches


def _batches(lengths: Sequence[int], batch_size: int, desc: str) -> list[list[int]]:
    """Length-sorted batches, behind a progress bar (stderr) when `desc` names the work: scoring a dev set
    of a thousand sentences takes minutes on a CPU."""
    batches = length_batches(lengths, batch_size)
    return tqdm(batches, desc=desc, unit="batch", dynamic_ncols=True) if desc else batches


@torch.no_grad()
def predict_logits(model: nn.Module, seqs: Sequence[list[int]], pad_id: int, batch_size: int,
                   precision, desc: str = "") -> Tensor:
    """Class logits (N, C) of a SequenceClassifier, in input order (eval mode, autocast)."""
    was_training = model.training
    model.eval()
    out: list[Tensor | None] = [None] * len(seqs)
    for idx in _batches([len(s) for s in seqs], batch_size, desc):
        ids, mask = right_pad([seqs[i] for i in idx], pad_id)
        with precision.autocast():
            logits = model(ids.to(precision.device), mask.to(precision.device)).float().cpu()
        for row, i in enumerate(idx):
            out[i] = logits[row]
    model.train(was_training)
    return torch.stack(out) if out else torch.zeros(0)


@torch.no_grad()
def zero_shot_scores(model: nn.Module, prompts: Sequence[list[int]], verbalizers: Sequence[list[int]],
                     pad_id: int, batch_size: int, precision, reduce: str = "sum", desc: str = "") -> Tensor:
    """log P(verbalizer | prompt) for each prompt and label: (N, C), summed (or averaged, `mean`) over
    the verbalizer's tokens. Single-token verbalizers need one forward per prompt (the last position's
    distribution); longer ones score each prompt + verbalizer sequence."""
    if reduce not in ("sum", "mean"):
        raise ConfigError(f"classify.score={reduce!r}: expected sum or mean")
    if any(not v for v in verbalizers):
        raise ConfigError("a verbalizer encodes to no tokens; give each label a non-empty verbalizer")
    model.eval()
    out = torch.zeros(len(prompts), len(verbalizers))
    single = all(len(v) == 1 for v in verbalizers)
    per_batch = batch_size if single else max(1, batch_size // len(verbalizers))
    for idx in _batches([len(p) for p in prompts], per_batch, desc):
        if single:
            seqs = [prompts[i] for i in idx]
            logp = token_logprobs(model, seqs, [[len(s) - 1] for s in seqs], pad_id, precision)
            ids = torch.tensor([v[0] for v in verbalizers])
            out[idx] = torch.stack([lp[0][ids] for lp in logp])
            continue
        seqs = [prompts[i] + v for i in idx for v in verbalizers]
        where = [list(range(len(prompts[i]) - 1, len(prompts[i]) - 1 + len(v))) for i in idx for v in verbalizers]
        logp = token_logprobs(model, seqs, where, pad_id, precision)
        for j, (lp, v) in enumerate(zip(logp, [v for _ in idx for v in verbalizers])):
            total = lp[torch.arange(len(v)), torch.tensor(v)].sum()
            out[idx[j // len(verbalizers)], j % len(verbalizers)] = total / (len(v) if reduce == "mean" else 1)
    return out


def token_logprobs(model: nn.Module, seqs: list[list[int]], positions: list[list[int]], pad_id: int,
                   precision) -> list[Tensor]:
    """Log-softmax over the vocabulary at the given positions of each sequence (list of (P_i, V)).
    Only those positions go through the output layer: the vocabulary matmul dominates otherwise."""
    ids, mask = right_pad(seqs, pad_id)
    with precision.autocast():
        hidden = model(ids.to(precision.device), attention_mask=mask.to(precision.device), return_hidden=True)
        rows = torch.cat([torch.full((len(p),), i) for i, p in enumerate(positions)])
        cols = torch.cat([torch.tensor(p) for p in positions])
        logits = model.output(hidden[rows.to(hidden.device), cols.to(hidden.device)])
    logp = F.log_softmax(logits.float(), dim=-1).cpu()
    return list(logp.split([len(p) for p in positions]))


