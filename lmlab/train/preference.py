"""Preference objectives: DPO (and its IPO / hinge / cDPO variants) and the Bradley-Terry reward model.

The losses are pure functions of per-sequence log-probabilities (torchtune `rlhf/loss/dpo.py` style), with
h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)), the policy's log-ratio margin:

    sigmoid  -(1 - e) log s(beta h) - e log s(-beta h)     DPO, Rafailov et al. 2023; e > 0: conservative DPO
                                                           (cDPO, Mitchell 2023: labels flipped with prob. e)
    ipo      (h / n - 1 / (2 beta))^2, log-ratios divided  IPO, Azar et al. 2023, length-normalised as TRL
             by each response's token count                (the authors' reported form)
    hinge    max(0, 1 - beta h)                            SLiC, Zhao et al. 2023

optionally plus sft_weight x the chosen response's mean token NLL (RPO, Pang et al. 2024). The objectives
`dpo_loss` and `reward_loss` follow the training seam (lmlab/train/losses.py): a loss *sum* over pairs,
count = pairs, and metric sums under TRL's names, which the loop divides by the step's pairs.

Log-probs are summed over completion tokens only, chosen from `prompt_lens` and `lengths` (never from token
ids: SmolLM2's pad is its EOS, and the EOS that closes a response must count). The 2B rows of a batch go
through one forward pass; only completion positions reach the vocabulary projection (a frozen head uses
the fused kernel of losses.py, so a LoRA policy holds no logits).

The reference is the same model with its LoRA adapters disabled (no copy in memory), a frozen copy for full
fine-tuning, or log-probs precomputed once and cached on disk under a hash of the token ids (data and
template), the model's weights and the precision (`ReferenceCache`; TRL issue 3985).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lmlab.adapters.lora import disable_lora
from lmlab.data.batch import Batch
from lmlab.data.preference import EncodedPair, pair_batches
from lmlab.errors import ConfigError
from lmlab.fileio import atomic_write
from lmlab.model.transformer import unwrap
from lmlab.precision import Precision
from lmlab.train.losses import LossOutput, linear_token_logprobs

LOSSES = ("sigmoid", "ipo", "hinge")
Reference = Callable[[Batch], Tensor]  # batch -> reference log-probs of its 2B rows


# ----------------------------------------------------------------------------------------------------
# the losses: pure functions of per-sequence log-probs


def dpo_pair_losses(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
                    beta: float = 0.1, kind: str = "sigmoid", label_smoothing: float = 0.0,
                    chosen_tokens: Tensor | None = None, rejected_tokens: Tensor | None = None) -> Tensor:
    """Per-pair loss (B,) from summed log-probs (B,) of policy and reference (see the module docstring)."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if kind == "sigmoid":
        h = beta * (chosen_ratio - rejected_ratio)
        return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    if kind == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo needs each response's token count")
        h = chosen_ratio / chosen_tokens.clamp_min(1) - rejected_ratio / rejected_tokens.clamp_min(1)
        return (h - 1 / (2 * beta)) ** 2
    if kind == "hinge":
        return torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    raise ConfigError(f"dpo.loss={kind!r}: expected one of {list(LOSSES)}")


def bradley_terry_losses(chosen: Tensor, rejected: Tensor, margin: Tensor | float = 0.0,
                         center: float = 0.0) -> Tensor:
    """-log s(r_w - r_l - margin) per pair (Bradley & Terry 1952; Llama 2's margin), plus center x (r_w + r_l)^2,
    which pins the rewards near zero (Eisenstein et al. 2023; TRL's center_rewards_coefficient)."""
    loss = -F.logsigmoid(chosen - rejected - margin)
    return loss + center * (chosen + rejected) ** 2 if center else loss


# ----------------------------------------------------------------------------------------------------
# log-probs of completions


def sequence_logps(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """(summed log-prob of each row's completion tokens (R,) fp32, their count (R,)) in one forward pass.
    Row r's completion is tokens prompt_lens[r] .. lengths[r]-1; right padding needs no attention mask."""
    ids, prompt, length = batch["input_ids"], batch["prompt_lens"], batch["lengths"]
    hidden = model(ids[:, :-1], return_hidden=True)  # (R, T-1, D): position t predicts token t+1
    pos = torch.arange(ids.shape[1] - 1, device=ids.device)[None]
    keep = (pos >= prompt[:, None] - 1) & (pos < length[:, None] - 1)  # (R, T-1)
    token_logps = linear_token_logprobs(hidden[keep], unwrap(model).output, ids[:, 1:][keep])
    rows = keep.nonzero()[:, 0]
    logps = torch.zeros(ids.shape[0], dtype=torch.float32, device=ids.device).index_add(0, rows, token_logps)
    return logps, keep.sum(1)


def lora_reference(model: nn.Module) -> Reference:
    """The reference as the policy's own base: its adapters disabled for one no-grad forward (no copy)."""
    def reference(batch: Batch) -> Tensor:
        was_training = model.training
        model.eval()  # the base's own dropout (if any) off, as TRL's disable_dropout
        try:
            with torch.no_grad(), disable_lora(model):
                return sequence_logps(model, batch)[0]
        finally:
            model.train(was_training)
    return reference


def frozen_reference(ref_model: nn.Module) -> Reference:
    """The reference as a separate frozen copy (full fine-tuning)."""
    ref_model.eval().requires_grad_(False)

    def reference(batch: Batch) -> Tensor:
        with torch.no_grad():
            return sequence_logps(ref_model, batch)[0]
    return reference


# ----------------------------------------------------------------------------------------------------
# the objectives


@dataclass(frozen=True)
class DPOSettings:
    """What the DPO objective needs besides the model: the loss and its constants."""

    beta: float = 0.1
    kind: str = "sigmoid"
    label_smoothing: float = 0.0
    sft_weight: float = 0.0


def dpo_loss(model: nn.Module, batch: Batch, *, settings: DPOSettings, reference: Reference | None = None) -> LossOutput:
    """The DPO objective over one micro-batch of B pairs (2B rows, chosen first). The reference log-probs
    come from `batch["ref_logps"]` when precomputed, else from `reference(batch)`."""
    logps, n_tokens = sequence_logps(model, batch)
    if "ref_logps" in batch:
        ref = batch["ref_logps"].to(logps.dtype)
    elif reference is not None:
        ref = reference(batch)
    else:
        raise ConfigError("dpo_loss needs a reference: precomputed batch['ref_logps'] or a reference function")
    s = settings
    (pc, pr), (rc, rr), (nc, nr) = logps.chunk(2), ref.detach().chunk(2), n_tokens.chunk(2)
    losses = dpo_pair_losses(pc, pr, rc, rr, beta=s.beta, kind=s.kind, label_smoothing=s.label_smoothing,
                             chosen_tokens=nc, rejected_tokens=nr)
    loss = losses.sum()
    metrics = {}
    if s.sft_weight:
        nll = (-pc / nc.clamp_min(1)).sum()
        loss = loss + s.sft_weight * nll
        metrics["sft/nll"] = nll.detach()
    chosen_reward, rejected_reward = s.beta * (pc - rc).detach(), s.beta * (pr - rr).detach()
    metrics |= {
        "rewards/chosen": chosen_reward.sum(), "rewards/rejected": rejected_reward.sum(),
        "rewards/accuracies": (chosen_reward > rejected_reward).sum(),
        "rewards/margins": (chosen_reward - rejected_reward).sum(),
        "logps/chosen": pc.detach().sum(), "logps/rejected": pr.detach().sum(),
    }
    return LossOutput(loss, pc.shape[0], int(batch["lengths"].sum()), metrics)


def reward_scores(model: nn.Module, batch: Batch) -> Tensor:
    """The scalar reward of each row (R,) fp32: a one-output SequenceClassifier read at the row's last token."""
    return model(batch["input_ids"], lengths=batch["lengths"]).squeeze(-1).float()


def reward_loss(model: nn.Module, batch: Batch, *, center: float = 0.0) -> LossOutput:
    """Bradley-Terry over one micro-batch of B pairs, with the per-pair `margin` of the data; metrics as
    TRL's RewardTrainer (accuracy, margin, mean_reward) as sums over pairs."""
    chosen, rejected = reward_scores(model, batch).chunk(2)
    losses = bradley_terry_losses(chosen, rejected, batch["margin"].to(chosen.dtype), center)
    c, r = chosen.detach(), rejected.detach()
    metrics = {"accuracy": (c > r).sum(), "margin": (c - r).sum(), "mean_reward": ((c + r) / 2).sum()}
    return LossOutput(losses.sum(), chosen.shape[0], int(batch["lengths"].sum()), metrics)


# ----------------------------------------------------------------------------------------------------
# whole splits: log-probs, scores, the cached reference


@torch.no_grad()
def _pair_scores(score: Callable[[nn.Module, dict[str, Tensor]], Tensor], model: nn.Module,
                 pairs: list[EncodedPair], batch_size: int, pad_id: int, precision: Precision) -> Tensor:
    """`score(model, batch)` of every pair as (N, 2) [chosen, rejected], in input order, in eval mode (a
    batch holds its pairs' chosen rows, then their rejected rows)."""
    was_training = model.training
    model.eval()
    out = torch.zeros(len(pairs), 2)
    batches, groups = pair_batches(pairs, batch_size, pad_id)
    for batch, group in zip(batches, groups):
        batch = {k: v.to(precision.device) for k, v in batch.items()}
        with precision.autocast():
            values = score(model, batch).float().cpu()
        out[group] = torch.stack(values.chunk(2), dim=1)
    model.train(was_training)
    return out


def pair_logps(model: nn.Module, pairs: list[EncodedPair], batch_size: int, pad_id: int,
               precision: Precision) -> Tensor:
    """Summed completion log-probs (N, 2) [chosen, rejected] of every pair (the DPO reference and policy)."""
    return _pair_scores(lambda m, batch: sequence_logps(m, batch)[0], model, pairs, batch_size, pad_id, precision)


def pair_rewards(model: nn.Module, pairs: list[EncodedPair], batch_size: int, pad_id: int,
                 precision: Precision) -> Tensor:
    """Reward-model scores (N, 2) [chosen, rejected] of every pair."""
    return _pair_scores(reward_scores, model, pairs, batch_size, pad_id, precision)


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's weights (every parameter and persistent buffer, by name) and its config."""
    raw = unwrap(model)
    h = hashlib.blake2b(digest_size=16)
    config = getattr(raw, "config", None)
    h.update(json.dumps(config.to_dict() if hasattr(config, "to_dict") else None, sort_keys=True,
                        default=str).encode())
    for name, t in sorted(raw.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")  # the bytes, not copied
    return h.hexdigest()


class ReferenceCache:
    """Reference log-probs of a split on disk: `<folder>/<key>.safetensors`, where key hashes the model's
    fingerprint, the precision and every pair's token ids (data, template and truncation all show there).
    A later run with the same three reuses the file; any change gives another key (a miss)."""

    def __init__(self, folder: str | Path, fingerprint: str, precision: Precision, extra: dict[str, Any]) -> None:
        self.folder, self.fingerprint, self.precision, self.extra = Path(folder), fingerprint, precision, extra

    def key(self, pairs: list[EncodedPair]) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps({"model": self.fingerprint, "dtype": self.precision.dtype_name,
                             "device": self.precision.device.type, **self.extra}, sort_keys=True).encode())
        for p in pairs:
            h.update(json.dumps([p.prompt, p.chosen, p.rejected]).encode())
        return h.hexdigest()

    def path(self, pairs: list[EncodedPair]) -> Path:
        return self.folder / f"{self.key(pairs)}.safetensors"

    def load_or_compute(self, pairs: list[EncodedPair], compute: Callable[[], Tensor]) -> tuple[Tensor, bool]:
        """(log-probs (N, 2), whether they came from the cache)."""
        path = self.path(pairs)
        if path.is_file():
            try:
                logps = load_file(str(path))["logps"]
                if logps.shape == (len(pairs), 2):
                    return logps, True
            except (SafetensorError, OSError, KeyError):
                pass  # a torn or foreign file: recompute and replace it
        logps = compute().float().contiguous()
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file({"logps": logps}, str(tmp), metadata={"pairs": str(len(pairs))}))
        return logps, False
