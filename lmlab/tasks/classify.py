"""Sentence classification runs (the minllama assignment as recipes): zero-shot prompting, full
fine-tuning and LoRA fine-tuning with a head, over any backbone `load_model` reads.

setup (data, backbone, head/LoRA, optimizer) -> `fit` (lmlab/train/loop.py, once per epoch so the dev
accuracy can pick the best epoch, as the seed does) -> predictions + metrics. Each run folder holds:
config.yaml, metrics.jsonl (training curve + dev accuracy per epoch), metrics.json (accuracy, macro-F1,
per-class precision/recall, confusion matrix per split), confusion_<split>.png, <split>-predictions.txt
(`PRED ||| text`, the seed's format), classifier.json and the adapter + head or the weights + head.
With several seeds each gets seed_N/ and the folder gets summary.json and results.md (mean +/- std).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmlab.adapters.files import load_adapter, save_lora
from lmlab.adapters.lora import LoRAConfig, apply_lora
from lmlab.data.batch import pad_id_of
from lmlab.data.classification import (
    SST2_NAMES,
    EpochBatches,
    LabeledTexts,
    PromptFormat,
    encode_all,
    prompt_format,
    read_label_names,
    read_split,
    write_predictions,
)
from lmlab.errors import ConfigError
from lmlab.evaluation.metrics import classification_metrics, mean_std
from lmlab.evaluation.plots import plot_confusion_matrix
from lmlab.evaluation.scoring import predict_logits, zero_shot_scores
from lmlab.fileio import atomic_write, atomic_write_text
from lmlab.model.heads import SequenceClassifier
from lmlab.precision import Precision, peak_memory_mb, resolve_device
from lmlab.schema.classify import ClassifyConfig
from lmlab.schema.load import load_config, save_config
from lmlab.train.distributed import seed_everything
from lmlab.train.logger import MetricsLogger
from lmlab.train.loop import FitConfig, fit
from lmlab.train.losses import classification_loss
from lmlab.train.optim import make_adamw, param_groups
from lmlab.train.schedule import Schedule
from lmlab.train.state import Progress
from lmlab.weights.checkpoint import save_checkpoint
from lmlab.weights.loading import load_model

SPLITS = ("dev", "test")
CLASSIFIER_META = "classifier.json"
HEAD_WEIGHTS = "head.safetensors"


@dataclass
class Splits:
    """The data of one run and what reading it skipped or cut (reported in metrics.json)."""

    label_names: list[str]
    data: dict[str, LabeledTexts] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        return {name: {"n": len(d), "source": d.source, "skipped_empty_lines": d.skipped_empty,
                       "dropped": d.dropped, "notes": d.notes} for name, d in self.data.items()}


def read_splits(cfg: ClassifyConfig) -> Splits:
    d = cfg.data
    if not d.label_names:
        raise ConfigError("data.label_names is empty: set the label-name mapping JSON")
    names = read_label_names(d.label_names)
    wanted = {"train": d.train if cfg.classify.method != "zeroshot" else "", "dev": d.dev, "test": d.test}
    if not d.dev and not d.test:
        raise ConfigError("data.dev and data.test are both empty: nothing to evaluate")
    if cfg.classify.method != "zeroshot" and not d.train:
        raise ConfigError(f"classify.method={cfg.classify.method} needs data.train")
    splits = Splits(names)
    for name, path in wanted.items():
        if path:
            data = read_split(path, names, d.format, d.text_field, d.label_field, d.sst2)
            splits.data[name] = data.sample(d.max_train if name == "train" else d.max_eval, seed=0)
            splits.label_names = data.label_names
    return splits


def label_phrase(names: list[str]) -> str:
    """"bad or good"; "awful, bad, average, good, or excellent" (the seed's prompt wording)."""
    return " or ".join(names) if len(names) == 2 else ", ".join(names[:-1]) + ", or " + names[-1]


def input_format(cfg: ClassifyConfig, tokenizer, names: list[str]) -> PromptFormat:
    c = cfg.classify
    text = (c.prompt if c.method == "zeroshot" else c.template).replace("{labels}", label_phrase(names))
    return prompt_format(tokenizer, text, cfg.data.max_len, chat=c.chat, system=c.system,
                         truncation=cfg.data.truncation)


# ---------------------------------------------------------------------------------------------------- one run

def run_one(cfg: ClassifyConfig, out: Path) -> dict[str, Any]:
    """One seed: train (unless zero-shot), predict dev/test, write the run folder; returns metrics."""
    t0 = time.perf_counter()
    precision = Precision(resolve_device(cfg.precision.device), cfg.precision.dtype)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    splits = read_splits(cfg)
    loaded = load_model(cfg.model.spec, device=precision.device, dtype=torch.float32,
                        tokenizer=cfg.model.tokenizer or None)
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise ConfigError(f"model.spec={cfg.model.spec!r} carries no tokenizer: set model.tokenizer")
    fmt = input_format(cfg, tokenizer, splits.label_names)
    encoded, truncated = {}, {}
    for name, data in splits.data.items():
        encoded[name], truncated[name] = encode_all(tokenizer, fmt, data.texts)
    save_config(cfg, out / "config.yaml")
    result: dict[str, Any] = {"method": cfg.classify.method, "model": loaded.source, "seed": cfg.train.seed,
                              "truncated": truncated, "max_len": cfg.data.max_len, "data": splits.report()}
    if cfg.classify.method == "zeroshot":
        model, predict = loaded.model, _zero_shot_predictor(cfg, loaded.model, tokenizer, precision)
    else:
        model = build_classifier(cfg, loaded.model, len(splits.label_names)).to(precision.device)
        predict = _head_predictor(cfg, model, tokenizer, precision)
        result["train"] = train_classifier(cfg, model, encoded, splits, tokenizer, precision, predict, out)
    t_pred = time.perf_counter()
    for name in SPLITS:
        if name in splits.data:
            known = result.get("train", {}).pop("best_dev_predictions", None) if name == "dev" else None
            result[name] = _evaluate_split(cfg, name, splits, known or predict(encoded[name]), out)
    result["predict_time_s"] = time.perf_counter() - t_pred
    if cfg.classify.save_model and cfg.classify.method != "zeroshot":
        save_classifier(cfg, model, tokenizer, splits.label_names, out)
    result["wall_time_s"] = time.perf_counter() - t0
    result["peak_mem_mb"] = peak_memory_mb(precision.device)
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2) + "\n")
    _print_line(out, result)
    return result


def build_classifier(cfg: ClassifyConfig, backbone: nn.Module, n_labels: int) -> SequenceClassifier:
    """Backbone + head; for LoRA, adapters on the target layers with the head trainable beside them."""
    model = SequenceClassifier(backbone, n_labels, cfg.classify.dropout, cfg.classify.pooling)
    if cfg.classify.method == "lora":
        lc = cfg.lora
        apply_lora(model, LoRAConfig(rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout, target_modules=lc.target_modules,
                                     trainable=["head"], use_rslora=lc.use_rslora))
    return model


def build_optimizer(cfg: ClassifyConfig, model: SequenceClassifier) -> torch.optim.Optimizer:
    """AdamW with the backbone's trainable weights first (the schedule's base) and the head at
    lr * head_lr_mult. Norms, biases and embeddings never decay (lmlab.train.optim.param_groups)."""

    o = cfg.optim
    groups = param_groups(model.backbone, o.weight_decay, o.decay_embeddings) + [
        {**g, "lr": o.lr * cfg.classify.head_lr_mult} for g in param_groups(model.head, o.weight_decay)]
    return make_adamw(groups, o.impl, o.lr, tuple(o.betas), o.eps)


def train_classifier(cfg: ClassifyConfig, model: SequenceClassifier, encoded: dict, splits: Splits, tokenizer,
                     precision, predict, out: Path) -> dict[str, Any]:
    """Epoch by epoch through the shared loop; after each, dev accuracy (and the best state kept)."""

    t = cfg.train
    batches = EpochBatches(encoded["train"], splits.data["train"].labels, t.batch_size, t.grad_accum, t.seed,
                           pad_id_of(tokenizer))
    total = max(1, math.ceil(t.epochs * batches.steps_per_epoch))
    optimizer = build_optimizer(cfg, model)
    schedule = Schedule(cfg.optim.lr, round(t.warmup_fraction * total), total, 0.0, t.schedule)
    logger, progress = MetricsLogger(out / "metrics.jsonl"), Progress()
    history, best, best_state, best_preds = [], -1.0, None, None
    dev = "dev" in splits.data and cfg.classify.select_best
    try:
        for epoch in range(math.ceil(total / batches.steps_per_epoch)):
            end = min(total, (epoch + 1) * batches.steps_per_epoch)
            fit_cfg = FitConfig(max_steps=end, grad_accum=t.grad_accum, grad_clip=t.grad_clip,
                                log_every=cfg.logging.log_every, progress_bar=cfg.logging.progress)
            res = fit(model, classification_loss, batches, optimizer, schedule, fit_cfg, precision,
                      logger=logger, progress=progress)
            row = {"epoch": epoch + 1, "step": progress.step, "train_loss": res.train_loss}
            if dev:
                preds = predict(encoded["dev"])
                labels = splits.data["dev"].labels
                row["dev_accuracy"] = sum(p == y for p, y in zip(preds, labels)) / max(len(labels), 1)
                logger.log({"step": progress.step, "split": "dev", "accuracy": row["dev_accuracy"], "epoch": epoch + 1})
                if row["dev_accuracy"] > best:
                    best, best_state, best_preds = row["dev_accuracy"], _trainable_state(model), preds
            history.append(row)
    finally:
        logger.close()
    if best_state is not None:
        _load_trainable(model, best_state)
    best_epoch = max(history, key=lambda r: r.get("dev_accuracy", 0.0))["epoch"] if dev else len(history)
    return {"steps": progress.step, "epochs": history, "best_epoch": best_epoch, "train_time_s": progress.elapsed_s,
            "examples_per_s": progress.step * t.batch_size / max(progress.elapsed_s, 1e-9),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "best_dev_predictions": best_preds}  # the kept state's dev predictions: no second pass


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def _load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for k, v in state.items():
        params[k].copy_(v)


def _head_predictor(cfg: ClassifyConfig, model: SequenceClassifier, tokenizer, precision):
    pad = pad_id_of(tokenizer)
    return lambda seqs: predict_logits(model, seqs, pad, cfg.classify.eval_batch_size, precision).argmax(-1).tolist()


def _zero_shot_predictor(cfg: ClassifyConfig, model: nn.Module, tokenizer, precision):
    verbalizers = zero_shot_verbalizers(cfg, tokenizer)
    pad = pad_id_of(tokenizer)
    return lambda seqs: zero_shot_scores(model, seqs, verbalizers, pad, cfg.classify.eval_batch_size, precision,
                                         cfg.classify.score).argmax(-1).tolist()


def zero_shot_verbalizers(cfg: ClassifyConfig, tokenizer) -> list[list[int]]:
    names = read_label_names(cfg.data.label_names)
    if cfg.data.sst2:
        names = SST2_NAMES
    words = cfg.classify.verbalizers or [n if cfg.classify.chat else " " + n for n in names]
    if len(words) != len(names):
        raise ConfigError(f"classify.verbalizers has {len(words)} entries for {len(names)} labels {names}")
    return [tokenizer.encode(w) for w in words]


def _evaluate_split(cfg: ClassifyConfig, name: str, splits: Splits, preds: list[int], out: Path) -> dict[str, Any]:
    """Write <name>-predictions.txt; metrics (+ confusion PNG) when the split's labels are real."""
    data = splits.data[name]
    write_predictions(out / f"{name}-predictions.txt", preds, data.texts)
    if name == "test" and not cfg.data.test_has_labels:
        return {"n": len(preds), "labels_hidden": True}
    metrics = classification_metrics(data.labels, preds, splits.label_names)
    try:
        plot_confusion_matrix(metrics["confusion"], splits.label_names, out / f"confusion_{name}.png",
                              title=f"{name}: accuracy {metrics['accuracy']:.3f}")
    except ImportError:  # matplotlib missing: the numbers are in metrics.json anyway
        pass
    return metrics


def _print_line(out: Path, r: dict[str, Any]) -> None:
    parts = [f"{s} acc {r[s]['accuracy']:.3f} macro-F1 {r[s]['macro_f1']:.3f}" for s in SPLITS
             if s in r and "accuracy" in r[s]]
    cut = ", ".join(f"{k} {v}" for k, v in r["truncated"].items() if v)
    print(f"{out}: {r['method']} seed {r['seed']}: {'; '.join(parts)} (wall {r['wall_time_s']:.0f} s"
          + (f"; truncated: {cut}" if cut else "") + ")")


# ---------------------------------------------------------------------------------------------------- save/load

def save_classifier(cfg: ClassifyConfig, model: SequenceClassifier, tokenizer, label_names: list[str], out: Path) -> None:
    """LoRA: adapter/ (adapters + head, lmlab/adapters/files.py). Full fine-tuning: model/ (an lmlab
    checkpoint of the backbone) + head.safetensors. classifier.json says how to rebuild either."""
    from safetensors.torch import save_file


    meta = {"method": cfg.classify.method, "model": cfg.model.spec, "tokenizer": cfg.model.tokenizer,
            "label_names": label_names, "pooling": cfg.classify.pooling, "dropout": cfg.classify.dropout,
            "template": cfg.classify.template, "chat": cfg.classify.chat, "system": cfg.classify.system,
            "max_len": cfg.data.max_len, "truncation": cfg.data.truncation}
    if cfg.classify.method == "lora":
        save_lora(model, out / "adapter")
    else:
        save_checkpoint(model.backbone, out / "model", tokenizer=tokenizer)
        head = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
        atomic_write(out / HEAD_WEIGHTS, lambda tmp: save_file(head, str(tmp)))
    atomic_write_text(out / CLASSIFIER_META, json.dumps(meta, indent=2) + "\n")


def load_classifier(run_dir: str | Path, device: str = "cpu") -> tuple[SequenceClassifier, Any, PromptFormat, dict]:
    """Rebuild a saved classifier: (model in eval mode, tokenizer, input format, classifier.json)."""
    from safetensors.torch import load_file


    run_dir = Path(run_dir)
    try:
        meta = json.loads((run_dir / CLASSIFIER_META).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{run_dir}: no {CLASSIFIER_META}; expected a classify run folder with a saved model") from None
    spec = meta["model"] if meta["method"] == "lora" else run_dir / "model"
    loaded = load_model(spec, device=device, dtype=torch.float32, tokenizer=meta["tokenizer"] or None)
    model = SequenceClassifier(loaded.model, len(meta["label_names"]), meta["dropout"], meta["pooling"])
    if meta["method"] == "lora":
        load_adapter(model, run_dir / "adapter")
    else:
        model.head.load_state_dict(load_file(str(run_dir / HEAD_WEIGHTS)))
    fmt = prompt_format(loaded.tokenizer, meta["template"], meta["max_len"], chat=meta["chat"], system=meta["system"],
                        truncation=meta["truncation"])
    return model.to(device).eval(), loaded.tokenizer, fmt, meta


# ---------------------------------------------------------------------------------------------------- seeds

def run_classify(cfg: ClassifyConfig, seeds: list[int] | None = None) -> dict[str, Any]:
    """One run in out_dir, or one per seed in out_dir/seed_N plus summary.json and results.md."""
    out = Path(cfg.out_dir)
    if not seeds:
        return run_one(cfg, out)
    runs = []
    for seed in seeds:
        c = copy.deepcopy(cfg)
        c.train.seed = seed
        runs.append(run_one(c, out / f"seed_{seed}"))
    summary = summarize(runs)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "results.md", results_markdown(summary) + "\n")
    print(results_markdown(summary))
    return summary


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample std over seeds of each split's accuracy and macro-F1, wall time and peak memory."""
    summary: dict[str, Any] = {"method": runs[0]["method"], "model": runs[0]["model"],
                               "seeds": [r["seed"] for r in runs], "n": len(runs)}
    for split in SPLITS:
        for metric in ("accuracy", "macro_f1"):
            vals = [r[split][metric] for r in runs if metric in r.get(split, {})]
            if vals:
                summary[f"{split}_{metric}"] = dict(zip(("mean", "std"), mean_std(vals)))
    summary["wall_time_s"] = dict(zip(("mean", "std"), mean_std([r["wall_time_s"] for r in runs])))
    summary["peak_mem_mb"] = max(r["peak_mem_mb"] for r in runs)
    return summary


def results_markdown(summary: dict[str, Any]) -> str:
    cells = []
    for key in ("dev_accuracy", "dev_macro_f1", "test_accuracy"):
        v = summary.get(key)
        cells.append(f"{v['mean']:.3f} ({v['std']:.3f})" if v else "-")
    return ("| method | seeds | dev acc | dev macro-F1 | test acc | wall s / seed | peak MB |\n|---|---|---|---|---|---|---|\n"
            f"| {summary['method']} | {summary['n']} | {' | '.join(cells)} | {summary['wall_time_s']['mean']:.0f} | "
            f"{summary['peak_mem_mb']:.0f} |")


def run_recipe(path: str | Path | None, overrides: list[str] = (), seeds: list[int] | None = None) -> dict[str, Any]:
    return run_classify(load_config(path, list(overrides), schema=ClassifyConfig), seeds)


__all__ = ["run_recipe", "run_classify", "run_one", "build_classifier", "build_optimizer", "train_classifier",
           "save_classifier", "load_classifier", "summarize", "label_phrase", "read_splits"]
