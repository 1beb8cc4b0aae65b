"""Direct Preference Optimization runs (`lmlab dpo RECIPE.yaml [a.b=c ...]`; Rafailov et al. 2023).

The setup: pairs -> seeded train/val/test split (written to pairs/) -> token ids; the policy is any loadable
model with a LoRA adapter (or every weight, `dpo.method=full`); the reference is the same model with the
adapter disabled (no copy), a frozen copy (full), or log-probs precomputed once and cached on disk
(`dpo.precompute_reference`); the objective `dpo_loss` (lmlab/train/preference.py) trains through the
training session. Around it: on the held-out test pairs, the reference's preference before (share of pairs
whose chosen response it gives the higher log-prob) and the policy's implicit-reward accuracy after, with
Wilson 95% intervals; then, with `eval.reward_model`, the generation-level check: responses sampled from
the reference and from the policy for the test prompts, both scored by the reward model, the policy's win
rate with its interval.

Run folder: config.yaml, metrics.jsonl (loss and TRL's rewards/... and logps/... on train and val),
summary.json, plots/, pairs/{train,val,test}.jsonl, checkpoints/, adapters/<name>/ (lmlab) and
adapters/<name>-peft/ (peft), or model/ (full); generations.jsonl with the check.
"""

from __future__ import annotations

import copy
import json
import math
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmlab.adapters.files import export_peft, load_adapter, save_adapter
from lmlab.adapters.lora import apply_lora, disable_lora, merge_lora, unmerge_lora
from lmlab.data.batch import pad_id_of
from lmlab.data.preference import EncodedPair, Pair, PairBatches, PreferenceFormat, Text, pair_batches
from lmlab.errors import ConfigError
from lmlab.evaluation.metrics import mean_interval, proportion_interval
from lmlab.fileio import atomic_write_text
from lmlab.generation.generate import GenerationConfig, generate
from lmlab.precision import Precision
from lmlab.schema.dpo import DPOConfig, DPOEvalSection
from lmlab.tasks.preference import encode_splits, plot_curves, preference_format, read_splits
from lmlab.tasks.reward import META as REWARD_META
from lmlab.tasks.reward import RewardScorer, load_reward_model
from lmlab.train.preference import (
    DPOSettings,
    ReferenceCache,
    dpo_loss,
    frozen_reference,
    lora_reference,
    model_fingerprint,
    pair_logps,
)
from lmlab.train.session import SUMMARY, Session
from lmlab.weights.checkpoint import save_checkpoint
from lmlab.weights.loading import load_model

CURVES = ["loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen",
          "logps/rejected"]


def run_dpo(cfg: DPOConfig) -> dict[str, Any]:
    """Train one DPO policy; returns the summary (also written to summary.json). Keys: method, adapter, model,
    data, reference, before {test}, after {test}, train (the session's summary), adapter_dir / peft_dir /
    model_dir, and generation when eval.reward_model is set."""
    splits, info = read_splits(cfg.data)  # before the session: bad data writes nothing
    if cfg.eval.reward_model and not (Path(cfg.eval.reward_model) / REWARD_META).is_file():
        raise ConfigError(f"eval.reward_model={cfg.eval.reward_model!r}: no {REWARD_META} there; train it first "
                          "(lmlab reward RECIPE.yaml) or leave eval.reward_model empty")
    with Session(cfg) as session:
        loaded = load_model(cfg.model.spec, device=session.device, tokenizer=cfg.model.tokenizer or None,
                            overrides=cfg.model.overrides)
        model, tok = loaded.model, loaded.tokenizer
        if tok is None:
            raise ConfigError(f"model.spec={cfg.model.spec!r} carries no tokenizer: set model.tokenizer")
        fmt = preference_format(cfg.data, tok)
        data = encode_splits(splits, fmt, session.out)
        t, e, d, pad = cfg.train, cfg.eval, cfg.dpo, pad_id_of(tok)
        steps_per_epoch = math.ceil(len(data["train"].pairs) / (t.batch_size * t.grad_accum))
        max_steps = session.max_steps(steps_per_epoch)
        if session.finished(max_steps):
            return _finished(session, cfg, model, tok, fmt, splits["test"])
        pairs = {k: v.pairs for k, v in data.items()}
        summary: dict[str, Any] = {"method": d.method, "adapter": cfg.adapter, "model": loaded.source,
                                   "data": {**info, **{k: v.summary() for k, v in data.items()}}}

        # the reference: log-probs of the base model, computed now for what is precomputed or held out
        ref: dict[str, torch.Tensor] = {}
        if d.precompute_reference:
            cache = ReferenceCache(d.cache_dir, model_fingerprint(model), session.precision,
                                   {"template": cfg.data.template, "system": cfg.data.system,
                                    "chat_template": tok.chat_template})
            hits = {}
            for name, ps in pairs.items():
                ref[name], hits[name] = cache.load_or_compute(
                    ps, lambda ps=ps: pair_logps(model, ps, e.batch_size, pad, session.precision))
            summary["reference"] = {"mode": "precomputed", "cache_dir": str(cache.folder), "cache_hit": hits,
                                    "files": {k: str(cache.path(v)) for k, v in pairs.items()}}
        elif pairs["test"]:
            ref["test"] = pair_logps(model, pairs["test"], e.batch_size, pad, session.precision)
        if pairs["test"]:
            summary["before"] = {"test": pair_report(ref["test"], None, d.beta)}
            print(f"before: {_acc_text(summary['before']['test'], 'reference_preference')}")

        if d.method == "lora":
            apply_lora(model, cfg.lora, name=cfg.adapter)
            reference = lora_reference(model)
            summary.setdefault("reference", {"mode": "lora-disabled"})
        else:
            reference = None if d.precompute_reference else frozen_reference(copy.deepcopy(model))
            summary.setdefault("reference", {"mode": "frozen-copy"})
        objective = partial(dpo_loss, settings=DPOSettings(d.beta, d.loss, d.label_smoothing, d.sft_weight),
                            reference=None if d.precompute_reference else reference)
        batches = PairBatches(data["train"], t.batch_size, t.grad_accum, t.seed, pad, ref.get("train"))
        val_batches = pair_batches(pairs["val"], e.batch_size, pad, ref.get("val"))[0]
        result = session.fit(model, objective, batches, max_steps=max_steps, steps_per_epoch=steps_per_epoch,
                             val_data=val_batches, trainable_only=d.method == "lora",
                             flops_per_token=model.flops_per_token(cfg.data.max_len), tokenizer=tok)
        kept = session.end_on_best(model, result, evaluated=bool(pairs["val"]))  # with checkpoint.best
        summary["train"] = session.summary(model, result, pairs=len(pairs["train"]), kept_step=kept)
        if pairs["test"]:
            policy = pair_logps(model, pairs["test"], e.batch_size, pad, session.precision)
            summary["after"] = {"test": pair_report(ref["test"], policy, d.beta)}
            _write_test_scores(session, pairs["test"], ref["test"], policy)
            print(f"after: {_acc_text(summary['after']['test'], 'implicit_accuracy')}")
        summary |= save_policy(cfg, model, tok, session)
        plot_curves(session.out, CURVES)
        if e.reward_model:
            summary["generation"] = _generation_check(session, cfg, model, tok, fmt, splits["test"])
        return session.finish(summary, line=_line(session, summary))


# ---------------------------------------------------------------------------------------------------- reports

def pair_report(ref: torch.Tensor, policy: torch.Tensor | None, beta: float) -> dict[str, Any]:
    """On held-out pairs ((N, 2) summed log-probs [chosen, rejected]): the reference's preference (chosen
    more likely); with a policy, its implicit-reward accuracy (beta log-ratio of chosen above rejected's),
    its own preference and the mean rewards; each share with a Wilson 95% interval."""
    n = ref.shape[0]
    out: dict[str, Any] = {"reference_preference": proportion_interval(float((ref[:, 0] > ref[:, 1]).sum()), n)}
    if policy is not None:
        chosen, rejected = beta * (policy[:, 0] - ref[:, 0]), beta * (policy[:, 1] - ref[:, 1])
        out |= {"implicit_accuracy": proportion_interval(float((chosen > rejected).sum()), n),
                "policy_preference": proportion_interval(float((policy[:, 0] > policy[:, 1]).sum()), n),
                "rewards/chosen": float(chosen.mean()), "rewards/rejected": float(rejected.mean()),
                "rewards/margins": mean_interval((chosen - rejected).tolist()),
                "logps/chosen": float(policy[:, 0].mean()), "logps/rejected": float(policy[:, 1].mean())}
    return out


def _acc_text(r: dict[str, Any], key: str) -> str:
    v = r[key]
    return f"{key} {v['value']:.3f} [{v['low']:.3f}, {v['high']:.3f}] on {v['n']} test pairs"


def _write_test_scores(session: Session, pairs: list[EncodedPair], ref: torch.Tensor, policy: torch.Tensor) -> None:
    atomic_write_text(session.out / "test-logps.jsonl", "".join(
        json.dumps({"source": p.where, "ref_chosen": float(r[0]), "ref_rejected": float(r[1]),
                    "policy_chosen": float(q[0]), "policy_rejected": float(q[1])}) + "\n"
        for p, r, q in zip(pairs, ref, policy)))


def _line(session: Session, s: dict[str, Any]) -> str:
    tr = s["train"]
    parts = [f"{session.out}: {s['method']} DPO: train_loss {tr['train_loss']:.4f}"]
    if "after" in s:
        parts.append(_acc_text(s["after"]["test"], "implicit_accuracy"))
    if "generation" in s:
        w = s["generation"]["win_rate"]
        parts.append(f"win rate {w['value']:.3f} [{w['low']:.3f}, {w['high']:.3f}] over {w['n']} prompts")
    return ", ".join(parts) + f"; {tr['steps']} steps in {tr['train_time_s']:.1f} s"


# ---------------------------------------------------------------------------------------------------- output

def save_policy(cfg: DPOConfig, model: nn.Module, tokenizer: Any, session: Session) -> dict[str, str]:
    """LoRA: adapters/<name>/ (lmlab) and adapters/<name>-peft/ (peft, loadable by PeftModel.from_pretrained);
    full: model/ (an lmlab checkpoint with the tokenizer)."""
    if cfg.dpo.method == "full":
        save_checkpoint(model, session.out / "model", tokenizer=tokenizer)
        return {"model_dir": str(session.out / "model")}
    out = {"adapter_dir": str(save_adapter(model, session.out / "adapters" / cfg.adapter))}
    if cfg.export_peft:
        out["peft_dir"] = str(export_peft(model, session.out / "adapters" / f"{cfg.adapter}-peft",
                                          base_model_name_or_path=cfg.model.spec))
    return out


def _finished(session: Session, cfg: DPOConfig, model: nn.Module, tok: Any, fmt: PreferenceFormat,
              test: list[Pair]) -> dict[str, Any]:
    """An earlier run's summary; when a reward model is named now and the check is missing, the saved
    policy is loaded and checked (train first, reward model later)."""
    summary = json.loads((session.out / SUMMARY).read_text())
    if not cfg.eval.reward_model or "generation" in summary:
        return summary
    if cfg.dpo.method == "full":
        model = load_model(session.out / "model", device=session.device).model
    else:
        load_adapter(model, session.out / "adapters" / cfg.adapter, name=cfg.adapter)
    summary["generation"] = _generation_check(session, cfg, model, tok, fmt, test)
    return session.finish(summary, line=_line(session, summary))


# ---------------------------------------------------------------------------------------------------- the check

def _generation_check(session: Session, cfg: DPOConfig, model: nn.Module, tok: Any, fmt: PreferenceFormat,
                      test: list[Pair]) -> dict[str, Any]:
    scorer = load_reward_model(cfg.eval.reward_model, session.device, cfg.precision.dtype)
    reference = None if cfg.dpo.method == "full" else "disable_lora"
    if cfg.dpo.method == "full":
        reference = load_model(cfg.model.spec, device=session.device, tokenizer=cfg.model.tokenizer or None,
                               overrides=cfg.model.overrides).model
    result, rows = generation_check(model, reference, tok, fmt, test, scorer, cfg.eval, cfg.train.seed,
                                    session.precision)
    result["reward_model"] = cfg.eval.reward_model
    result["reward_model_overlap"] = _overlap(cfg.eval.reward_model, test)
    atomic_write_text(session.out / "generations.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                                 for r in rows))
    w = result["win_rate"]
    print(f"generation check: policy mean reward {result['mean_reward']['policy']['value']:.3f} vs reference "
          f"{result['mean_reward']['reference']['value']:.3f}; win rate {w['value']:.3f} [{w['low']:.3f}, {w['high']:.3f}]")
    return result


def generation_check(model: nn.Module, reference: nn.Module | str | None, tokenizer: Any, fmt: PreferenceFormat,
                     pairs: list[Pair], scorer: RewardScorer, e: DPOEvalSection, seed: int,
                     precision: Precision) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Sample a response to each of the first e.prompts prompts from the reference and from the policy (same
    seed and batches, so both draw the same random numbers), score both with the reward model, and report
    each side's mean reward and the policy's win rate (a tie counts 1/2) with 95% intervals.

    reference: a separate model, or "disable_lora" for the policy's own base (its adapters disabled)."""
    chosen = pairs[: e.prompts] if e.prompts else pairs
    prompts = [fmt.prompt_text(p.prompt) for p in chosen]
    gen = GenerationConfig(e.max_new_tokens, e.sampling(), seed=seed)

    def sample(m: nn.Module) -> list[str]:
        with precision.autocast():
            return [s.strip() for s in generate(m, tokenizer, prompts, gen, batch_size=e.generation_batch_size)]

    if reference == "disable_lora":
        with disable_lora(model):
            ref_texts = sample(model)
        merge_lora(model)  # the policy decodes with its adapter folded in: one matmul per layer
        try:
            pol_texts = sample(model)
        finally:
            unmerge_lora(model)
    else:
        ref_texts, pol_texts = sample(reference), sample(model)
    as_items = lambda texts: [(p.prompt, _response(p.prompt, t)) for p, t in zip(chosen, texts)]
    r_ref = scorer.score(as_items(ref_texts), e.batch_size)
    r_pol = scorer.score(as_items(pol_texts), e.batch_size)
    outcome = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(r_pol.tolist(), r_ref.tolist())]
    result = {"n": len(chosen), "temperature": e.temperature, "seed": seed, "max_new_tokens": e.max_new_tokens,
              "mean_reward": {"reference": mean_interval(r_ref.tolist()), "policy": mean_interval(r_pol.tolist())},
              "win_rate": mean_interval(outcome), "wins": outcome.count(1.0), "ties": outcome.count(0.5),
              "losses": outcome.count(0.0),
              "mean_chars": {"reference": sum(map(len, ref_texts)) / len(chosen),
                             "policy": sum(map(len, pol_texts)) / len(chosen)}}
    rows = [{"source": p.where, "reference": a, "policy": b, "reward_reference": float(x), "reward_policy": float(y)}
            for p, a, b, x, y in zip(chosen, ref_texts, pol_texts, r_ref, r_pol)]
    return result, rows


def _response(prompt: Text, text: str) -> Text:
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def _overlap(reward_dir: str, test: list[Pair]) -> int:
    """Test prompts of this run that the reward model trained on (0 when both used the same split)."""
    train = Path(reward_dir) / "pairs" / "train.jsonl"
    if not train.is_file():
        return -1
    seen = {json.dumps(json.loads(line)["prompt"], sort_keys=True) for line in train.read_text().splitlines() if line}
    return sum(json.dumps(p.prompt, sort_keys=True) in seen for p in test)
