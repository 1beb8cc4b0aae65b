"""Sentence classification on a decoder LM: a head on the last (or mean) hidden state, its loss, prompt
encoding with truncation, batching, and zero-shot scoring by label log-probability.

The backbone is any lmlab Transformer (`model(tokens, mask, return_hidden=True)` -> (B, T, dim)); the head
lives beside it in `SequenceClassifier` so LoRA can mark it `trainable` and save it with the adapter.
The objective is a pure function (`classification_loss`) handed to the one training loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.errors import ConfigError
from lmlab.generate import length_batches
from lmlab.losses import IGNORE_INDEX, Batch

TEXT = "{text}"
_SENTINEL = "\x00TEXT\x00"
TRUNCATIONS = ("head", "tail", "middle")


# ---------------------------------------------------------------------------------------------------- model

def pool(hidden: Tensor, mask: Tensor, mode: str) -> Tensor:
    """(B, T, D) -> (B, D): the last real token (either padding side) or the mean over real tokens."""
    if mode == "last":
        last = mask.long().cumsum(1).argmax(1)  # first slot reaching the final count = last real token
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    if mode == "mean":
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    raise ConfigError(f"classify.pooling={mode!r}: expected last or mean")


class SequenceClassifier(nn.Module):
    """backbone (a Transformer) + dropout + linear head; returns class logits (B, C)."""

    def __init__(self, backbone: nn.Module, n_labels: int, dropout: float = 0.3, pooling: str = "last") -> None:
        super().__init__()
        pool(torch.zeros(1, 1, 1), torch.ones(1, 1), pooling)  # reject a bad mode now, not mid-run
        self.backbone = backbone
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.config.dim, n_labels)
        # zero at start: uniform predictions, loss ln(C), and no gradient into the backbone until the head has
        # learned a direction. A randomly initialized head on final-norm states (norms in the tens for
        # SmolLM2) starts with large confident logits whose gradients scramble the backbone in the first
        # steps (measured: CFIMDB train loss above ln 2 for 30 steps, dev 0.73 after one epoch).
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.backbone(input_ids, attention_mask=attention_mask, return_hidden=True)  # (B, T, D)
        return self.head(self.dropout(pool(hidden, attention_mask, self.pooling)))


def classification_loss(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy over the batch and the number of examples (the loop divides once).
    Labels equal to IGNORE_INDEX count for nothing (a filler example in an otherwise empty micro-batch)."""
    logits = model(batch["input_ids"], batch["attention_mask"])
    labels = batch["labels"]
    loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (labels != IGNORE_INDEX).sum()


# ---------------------------------------------------------------------------------------------------- encoding

@dataclass
class PromptFormat:
    """Token ids around the text: BOS + prefix + text (truncated) + suffix."""

    prefix: list[int]
    suffix: list[int]
    max_len: int
    truncation: str = "middle"

    def encode(self, tokenizer, text: str) -> tuple[list[int], bool]:
        """(ids, whether the text was truncated to fit max_len)."""
        ids = tokenizer.encode(text)
        room = self.max_len - len(self.prefix) - len(self.suffix)
        if room <= 0:
            raise ConfigError(f"max_len={self.max_len} leaves no room for text after the template's "
                              f"{len(self.prefix) + len(self.suffix)} tokens")
        cut = len(ids) > room
        if cut:
            ids = truncate(ids, room, self.truncation)
        return self.prefix + ids + self.suffix, cut


def truncate(ids: list[int], n: int, how: str) -> list[int]:
    """Keep n tokens: the start (head), the end (tail), or the first quarter and last three quarters
    (middle: Sun et al. 2019 found head+tail best for long reviews, where verdicts sit at the end)."""
    if how == "head":
        return ids[:n]
    if how == "tail":
        return ids[len(ids) - n:]
    if how == "middle":
        first = n // 4
        return ids[:first] + ids[len(ids) - (n - first):]
    raise ConfigError(f"truncation={how!r}: expected one of {TRUNCATIONS}")


def prompt_format(tokenizer, template: str, max_len: int, *, chat: bool = False, system: str = "",
                  truncation: str = "middle") -> PromptFormat:
    """Split `template` (which must hold {text}) into prefix/suffix ids; with `chat` the template is the
    user turn of the tokenizer's chat template and the suffix ends at the assistant's turn."""
    if template.count(TEXT) != 1:
        raise ConfigError(f"template {template!r}: must contain {TEXT} exactly once")
    if truncation not in TRUNCATIONS:
        raise ConfigError(f"truncation={truncation!r}: expected one of {TRUNCATIONS}")
    text = template.replace(TEXT, _SENTINEL)
    bos: list[int] = []
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    elif tokenizer.add_bos and tokenizer.bos_id is not None:
        bos = [tokenizer.bos_id]
    before, after = text.split(_SENTINEL)
    return PromptFormat(bos + tokenizer.encode(before), tokenizer.encode(after), max_len, truncation)


def encode_all(tokenizer, fmt: PromptFormat, texts: Sequence[str]) -> tuple[list[list[int]], int]:
    """Encoded texts and how many were truncated."""
    out, n_cut = [], 0
    for t in texts:
        ids, cut = fmt.encode(tokenizer, t)
        out.append(ids)
        n_cut += cut
    return out, n_cut


def collate(seqs: Sequence[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad to the longest: (input_ids, attention_mask), both (B, T). (Generation's left padding is
    `lmlab.generate.left_pad`.)"""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


class EpochBatches:
    """The training batch source for `fit`: a fresh seeded shuffle each epoch, `batch_size` examples per
    optimizer step split into `grad_accum` micro-batches. The last step of an epoch may be smaller."""

    def __init__(self, seqs: list[list[int]], labels: list[int], batch_size: int, grad_accum: int, seed: int,
                 pad_id: int) -> None:
        if batch_size <= 0 or grad_accum <= 0:
            raise ConfigError(f"train.batch_size={batch_size} and train.grad_accum={grad_accum} must be > 0")
        self.seqs, self.labels, self.pad_id = seqs, labels, pad_id
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.steps_per_epoch = math.ceil(len(seqs) / batch_size)
        self._epoch, self._order = -1, torch.arange(0)

    def __call__(self, step: int, micro: int) -> Batch:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.seqs), generator=g)
        step_idx = self._order[k * self.batch_size:(k + 1) * self.batch_size]
        # micro-batches of similar lengths: less padding, the same examples in the same optimizer step
        step_idx = step_idx[torch.tensor([len(self.seqs[i]) for i in step_idx]).argsort(stable=True)]
        idx = step_idx.tensor_split(self.grad_accum)[micro]
        labels = [self.labels[i] for i in idx]
        if len(idx) == 0:  # a last step smaller than grad_accum: one example that counts for nothing
            idx, labels = self._order[:1], [IGNORE_INDEX]
        ids, mask = collate([self.seqs[i] for i in idx], self.pad_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(labels)}


def pad_id_of(tokenizer) -> int:
    for tid in (tokenizer.pad_id, tokenizer.eos_id, 0):
        if tid is not None:
            return tid
    return 0


# ---------------------------------------------------------------------------------------------------- inference

@torch.no_grad()
def predict_logits(model: nn.Module, seqs: Sequence[list[int]], pad_id: int, batch_size: int,
                   precision) -> Tensor:
    """Class logits (N, C) of a SequenceClassifier, in input order (eval mode, autocast)."""
    was_training = model.training
    model.eval()
    out: list[Tensor | None] = [None] * len(seqs)
    for idx in length_batches([len(s) for s in seqs], batch_size):
        ids, mask = collate([seqs[i] for i in idx], pad_id)
        with precision.autocast():
            logits = model(ids.to(precision.device), mask.to(precision.device)).float().cpu()
        for row, i in enumerate(idx):
            out[i] = logits[row]
    model.train(was_training)
    return torch.stack(out) if out else torch.zeros(0)


@torch.no_grad()
def zero_shot_scores(model: nn.Module, prompts: Sequence[list[int]], verbalizers: Sequence[list[int]],
                     pad_id: int, batch_size: int, precision, reduce: str = "sum") -> Tensor:
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
    for idx in length_batches([len(p) for p in prompts], per_batch):
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
    ids, mask = collate(seqs, pad_id)
    with precision.autocast():
        hidden = model(ids.to(precision.device), attention_mask=mask.to(precision.device), return_hidden=True)
        rows = torch.cat([torch.full((len(p),), i) for i, p in enumerate(positions)])
        cols = torch.cat([torch.tensor(p) for p in positions])
        logits = model.output(hidden[rows.to(hidden.device), cols.to(hidden.device)])
    logp = F.log_softmax(logits.float(), dim=-1).cpu()
    return list(logp.split([len(p) for p in positions]))


__all__ = [
    "SequenceClassifier", "classification_loss", "pool", "PromptFormat", "prompt_format", "truncate",
    "encode_all", "collate", "EpochBatches", "predict_logits", "zero_shot_scores", "token_logprobs", "pad_id_of",
]
