"""Reward models (`lmlab reward RECIPE.yaml`, `lmlab reward score RUN_DIR --data FILE`).

A sequence scorer: the backbone plus a one-output head on the last real token (lmlab/model/heads.py with
n_labels=1, TRL's num_labels=1 model), trained with the Bradley-Terry objective (lmlab/train/preference.py,
optional per-pair margin and reward centring) through the training session, LoRA (adapters + head) or full.

Run folder: config.yaml, metrics.jsonl (loss, accuracy, margin, mean_reward; validation also min/max),
summary.json (test accuracy with its 95% interval, margin, rewards, the shorter-response baseline),
plots/, pairs/{train,val,test}.jsonl, test-scores.jsonl, reward_model.json + adapter/ (LoRA: adapters and
head) or model/ + head.safetensors (full).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmlab.adapters.files import load_adapter, save_adapter
from lmlab.adapters.lora import apply_lora
from lmlab.data.batch import pad_id_of, right_pad
from lmlab.data.preference import (
    EncodedPair,
    PairBatches,
    PreferenceFormat,
    Text,
    encode_completion,
    encode_pairs,
    read_completions,
    read_json_lines,
    read_pairs,
)
from lmlab.errors import CheckpointError, ConfigError
from lmlab.evaluation.metrics import mean_interval, proportion_interval
from lmlab.fileio import atomic_write, atomic_write_text
from lmlab.generation.generate import length_batches
from lmlab.model.heads import SequenceClassifier
from lmlab.precision import Precision, resolve_device
from lmlab.schema.dpo import PreferenceDataSection
from lmlab.schema.reward import RewardConfig
from lmlab.tasks.preference import encode_splits, plot_curves, preference_format, read_splits
from lmlab.train.optim import param_groups
from lmlab.train.preference import bradley_terry_losses, pair_rewards, reward_loss, reward_scores
from lmlab.train.session import SUMMARY, Session
from lmlab.weights.checkpoint import save_checkpoint
from lmlab.weights.loading import load_model

META = "reward_model.json"
HEAD_WEIGHTS = "head.safetensors"
ADAPTER = "reward"


def build_reward_model(cfg: RewardConfig, backbone: nn.Module) -> SequenceClassifier:
    """Backbone + zero-initialised one-output head (step 0 scores every response 0: loss ln 2); with LoRA the
    head trains beside the adapters and is saved with them."""
    model = SequenceClassifier(backbone, 1, cfg.reward.dropout, "last", bias=False)
    if cfg.reward.method == "lora":
        apply_lora(model, cfg.lora.model_copy(update={"trainable": [*cfg.lora.trainable, "head"]}), name=ADAPTER)
    return model


def reward_report(rewards: torch.Tensor, pairs: list[EncodedPair]) -> dict[str, Any]:
    """Accuracy (chosen scored above rejected) with its Wilson 95% interval, the mean margin, the rewards'
    mean/min/max, and the baseline that always prefers the shorter response (what length alone gets)."""
    chosen, rejected = rewards[:, 0], rewards[:, 1]
    n = len(pairs)
    shorter = sum(len(p.chosen) < len(p.rejected) for p in pairs)
    return {"accuracy": proportion_interval(float((chosen > rejected).sum()), n),
            "margin": mean_interval((chosen - rejected).tolist()),
            "mean_reward": float(rewards.mean()), "min_reward": float(rewards.min()),
            "max_reward": float(rewards.max()), "shorter_response_baseline": proportion_interval(shorter, n)}


def run_reward(cfg: RewardConfig) -> dict[str, Any]:
    """Train one reward model; returns the summary (also written to summary.json)."""
    splits, info = read_splits(cfg.data)  # before the session: bad data writes nothing
    with Session(cfg) as session:
        loaded = load_model(cfg.model.spec, device=session.device, tokenizer=cfg.model.tokenizer or None,
                            overrides=cfg.model.overrides)
        tok = loaded.tokenizer
        if tok is None:
            raise ConfigError(f"model.spec={cfg.model.spec!r} carries no tokenizer: set model.tokenizer")
        data = encode_splits(splits, preference_format(cfg.data, tok), session.out)
        t, pad = cfg.train, pad_id_of(tok)
        batches = PairBatches(data["train"], t.batch_size, t.grad_accum, t.seed, pad)
        max_steps = session.max_steps(batches.steps_per_epoch)
        if session.finished(max_steps):
            return json.loads((session.out / SUMMARY).read_text())
        model = build_reward_model(cfg, loaded.model).to(session.device)
        val, precision = data["val"].pairs, session.precision

        def validation(model_: nn.Module, step: int) -> dict[str, dict[str, float]]:
            rewards = pair_rewards(model_, val, cfg.eval.batch_size, pad, precision)
            loss = bradley_terry_losses(rewards[:, 0], rewards[:, 1], torch.tensor([p.margin for p in val]),
                                        cfg.reward.center)
            r = reward_report(rewards, val)
            return {"val": {"loss": float(loss.mean()), "accuracy": r["accuracy"]["value"],
                            "margin": r["margin"]["value"], "mean_reward": r["mean_reward"],
                            "min_reward": r["min_reward"], "max_reward": r["max_reward"]}}

        o = cfg.optim
        groups = param_groups(model.backbone, o.weight_decay, o.decay_embeddings) + [
            {**g, "lr": o.lr * cfg.reward.head_lr_mult} for g in param_groups(model.head, o.weight_decay)]
        result = session.fit(model, partial(reward_loss, center=cfg.reward.center), batches, max_steps=max_steps,
                             steps_per_epoch=batches.steps_per_epoch, evaluate=validation if val else None,
                             select="val.accuracy", mode="max", groups=groups,
                             trainable_only=True,  # a SequenceClassifier is no Transformer checkpoint
                             flops_per_token=model.backbone.flops_per_token(cfg.data.max_len), tokenizer=tok)
        kept = session.end_on_best(model, result, evaluated=bool(val))  # test and save that step
        summary: dict[str, Any] = {"method": cfg.reward.method, "model": loaded.source,
                                   "data": {**info, **{k: v.summary() for k, v in data.items()}},
                                   "train": session.summary(model, result, pairs=len(data["train"].pairs),
                                                            kept_step=kept)}
        test = data["test"].pairs
        if test:
            rewards = pair_rewards(model, test, cfg.eval.batch_size, pad, precision)
            summary["test"] = reward_report(rewards, test)
            atomic_write_text(session.out / "test-scores.jsonl", "".join(
                json.dumps({"source": p.where, "chosen": float(r[0]), "rejected": float(r[1])}) + "\n"
                for p, r in zip(test, rewards)))
        save_reward_model(cfg, model, tok, session.out)
        plot_curves(session.out, ["loss", "accuracy", "margin", "mean_reward"])
        return session.finish(summary, line=_line(session.out, summary))


def _line(out: Path, s: dict[str, Any]) -> str:
    tr = s["train"]
    acc = s.get("test", {}).get("accuracy")
    test = f", test accuracy {acc['value']:.3f} [{acc['low']:.3f}, {acc['high']:.3f}] (n={acc['n']})" if acc else ""
    kept = f" (kept step {tr['kept_step']}, best validation accuracy)" if tr["kept_step"] != tr["steps"] else ""
    return (f"{out}: reward model: train_loss {tr['train_loss']:.4f}{test}, {tr['steps']} steps{kept} in "
            f"{tr['train_time_s']:.1f} s")


# ---------------------------------------------------------------------------------------------------- save/load

def save_reward_model(cfg: RewardConfig, model: SequenceClassifier, tokenizer: Any, out: Path) -> None:
    """LoRA: adapter/ (adapters + head). Full: model/ (an lmlab checkpoint) + head.safetensors. reward_model.json
    records how to rebuild and how to encode inputs (the data section's template and truncation)."""
    meta = {"method": cfg.reward.method, "model": cfg.model.spec, "tokenizer": cfg.model.tokenizer,
            "overrides": cfg.model.overrides, "dropout": cfg.reward.dropout, "data": cfg.data.model_dump()}
    if cfg.reward.method == "lora":
        save_adapter(model, out / "adapter")
    else:
        save_checkpoint(model.backbone, out / "model", tokenizer=tokenizer)
        head = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
        atomic_write(out / HEAD_WEIGHTS, lambda tmp: save_file(head, str(tmp)))
    atomic_write_text(out / META, json.dumps(meta, indent=2) + "\n")


@dataclass
class RewardScorer:
    """A loaded reward model and how it encodes inputs; `score` gives one reward per (prompt, response)."""

    model: SequenceClassifier
    tokenizer: Any
    fmt: PreferenceFormat
    precision: Precision
    source: str = ""

    @property
    def pad_id(self) -> int:
        return pad_id_of(self.tokenizer)

    @torch.no_grad()
    def score(self, items: Sequence[tuple[Text, Text]], batch_size: int = 8) -> torch.Tensor:
        """Rewards (N,) of prompt + response sequences, in input order."""
        seqs = [encode_completion(prompt, response, self.fmt, f"item {i}")[0] for i, (prompt, response) in enumerate(items)]
        out = torch.zeros(len(seqs))
        self.model.eval()
        for idx in length_batches([len(s) for s in seqs], batch_size):
            ids, _ = right_pad([seqs[i] for i in idx], self.pad_id)
            batch = {"input_ids": ids.to(self.precision.device),
                     "lengths": torch.tensor([len(seqs[i]) for i in idx], device=self.precision.device)}
            with self.precision.autocast():
                out[idx] = reward_scores(self.model, batch).cpu()
        return out

    def score_pairs(self, pairs: list[EncodedPair], batch_size: int = 8) -> torch.Tensor:
        return pair_rewards(self.model, pairs, batch_size, self.pad_id, self.precision)


def load_reward_model(run_dir: str | Path, device: str | torch.device = "cpu", dtype: str = "bf16") -> RewardScorer:
    """Rebuild a saved reward model (eval mode) with its input format."""
    run_dir = Path(run_dir)
    try:
        meta = json.loads((run_dir / META).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{run_dir}: no {META}; expected a finished `lmlab reward` run folder") from None
    except ValueError as err:  # bad JSON or bytes that are not UTF-8
        raise CheckpointError(f"{run_dir / META}: not valid JSON text ({err})") from None
    keys = ("method", "model", "tokenizer", "overrides", "dropout", "data")
    if not isinstance(meta, dict) or any(k not in meta for k in keys):
        raise CheckpointError(f"{run_dir / META}: expected an object with the keys {', '.join(keys)}; "
                              "rerun `lmlab reward` to write it again")
    precision = Precision(resolve_device(device, "--device"), dtype)
    spec = meta["model"] if meta["method"] == "lora" else run_dir / "model"
    loaded = load_model(spec, device=precision.device, tokenizer=meta["tokenizer"] or None,
                        overrides=meta["overrides"] if meta["method"] == "lora" else None)
    model = SequenceClassifier(loaded.model, 1, meta["dropout"], "last", bias=False)
    if meta["method"] == "lora":
        load_adapter(model, run_dir / "adapter", name=ADAPTER)
    else:
        model.head.load_state_dict(load_file(str(run_dir / HEAD_WEIGHTS)))
    d = PreferenceDataSection(**meta["data"])
    fmt = preference_format(d, loaded.tokenizer)
    return RewardScorer(model.to(precision.device).eval(), loaded.tokenizer, fmt, precision, str(run_dir))


def score_file(run_dir: str | Path, data: str | Path, out: str | Path | None = None, batch_size: int = 8,
               device: str = "cpu", dtype: str = "bf16") -> dict[str, Any]:
    """Score a JSONL file: pairs (TRL format or HH-RLHF: both responses, accuracy) or prompt-completion lines
    (one reward each). Writes one JSON line per input to `out` (if given); returns the summary."""
    scorer = load_reward_model(run_dir, device, dtype)
    first = _first_object(Path(data))
    if "chosen" in first:
        read = read_pairs([data])
        enc = encode_pairs(read.pairs, scorer.fmt)
        rewards = scorer.score_pairs(enc.pairs, batch_size)
        rows = [{"source": p.where, "chosen": float(r[0]), "rejected": float(r[1])} for p, r in zip(enc.pairs, rewards)]
        summary = {"kind": "pairs", **reward_report(rewards, enc.pairs), "skipped": dict(read.skipped + enc.skipped)}
    else:
        items = read_completions(data)
        rewards = scorer.score([(p, c) for p, c, _ in items], batch_size)
        rows = [{"source": w, "reward": float(r)} for (_, _, w), r in zip(items, rewards)]
        summary = {"kind": "completions", "n": len(rows), "reward": mean_interval(rewards.tolist())}
    if out:
        atomic_write_text(Path(out), "".join(json.dumps(r) + "\n" for r in rows))
    return summary


def _first_object(path: Path) -> dict[str, Any]:
    for _, row in read_json_lines(path):
        if isinstance(row, dict):
            return row
        break
    raise ConfigError(f"{path}: expected JSONL objects (pairs with chosen/rejected, or prompt/completion)")
