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

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmlab.adapters.files import load_adapter, save_lora
from lmlab.adapters.lora import apply_lora
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
from lmlab.precision import peak_memory_mb
from lmlab.schema.classify import ClassifyConfig
from lmlab.train.losses import classification_loss
from lmlab.train.optim import param_groups
from lmlab.train.session import SUMMARY, Session
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

def run_one(cfg: ClassifyConfig) -> dict[str, Any]:
    """One seed in cfg.out_dir: train (unless zero-shot), predict dev/test, write the run folder; returns
    the result (also in summary.json; per-split metrics in metrics.json)."""
    with Session(cfg) as session:
        splits = read_splits(cfg)
        loaded = load_model(cfg.model.spec, device=session.device, dtype=torch.float32,
                            tokenizer=cfg.model.tokenizer or None, overrides=cfg.model.overrides)
        tokenizer = loaded.require_tokenizer("set model.tokenizer=PATH")
        fmt = input_format(cfg, tokenizer, splits.label_names)
        encoded, truncated = {}, {}
        for name, data in splits.data.items():
            encoded[name], truncated[name] = encode_all(tokenizer, fmt, data.texts)
        result: dict[str, Any] = {"method": cfg.classify.method, "model": loaded.source, "seed": cfg.train.seed,
                                  "truncated": truncated, "max_len": cfg.data.max_len, "data": splits.report()}
        known: dict[str, list[int]] = {}
        if cfg.classify.method == "zeroshot":
            model, predict = loaded.model, _zero_shot_predictor(cfg, loaded.model, tokenizer, session.precision)
        else:
            model = build_classifier(cfg, loaded.model, len(splits.label_names)).to(session.device)
            predict = _head_predictor(cfg, model, tokenizer, session.precision)
            trained = train_classifier(session, cfg, model, encoded, splits, tokenizer, predict)
            if trained is None:  # an earlier run finished this one
                return json.loads((session.out / SUMMARY).read_text())
            result["train"], known = trained
        t_pred = time.perf_counter()
        for name in SPLITS:
            if name in splits.data:
                preds = known.get(name) or predict(encoded[name], _desc(cfg, name, len(encoded[name])))
                result[name] = _evaluate_split(cfg, name, splits, preds, session.out)
        result["predict_time_s"] = time.perf_counter() - t_pred
        if cfg.classify.save_model and cfg.classify.method != "zeroshot":
            save_classifier(cfg, model, tokenizer, splits.label_names, session.out)
        result["peak_mem_mb"] = peak_memory_mb(session.device)
        atomic_write_text(session.out / "metrics.json",
                          json.dumps({k: result[k] for k in SPLITS if k in result}, indent=2) + "\n")
        result["wall_time_s"] = time.perf_counter() - session.t0
        return session.finish(result, line=_line(session.out, result))


def build_classifier(cfg: ClassifyConfig, backbone: nn.Module, n_labels: int) -> SequenceClassifier:
    """Backbone + head; for LoRA, adapters on the target layers with the head trainable beside them."""
    model = SequenceClassifier(backbone, n_labels, cfg.classify.dropout, cfg.classify.pooling)
    if cfg.classify.method == "lora":
        apply_lora(model, cfg.lora.model_copy(update={"trainable": [*cfg.lora.trainable, "head"]}))
    return model


def head_groups(cfg: ClassifyConfig, model: SequenceClassifier) -> list[dict]:
    """AdamW groups: the backbone's trainable weights first (the schedule's base) and the head at
    lr * head_lr_mult. Norms, biases and embeddings never decay (lmlab.train.optim.param_groups)."""
    o = cfg.optim
    return param_groups(model.backbone, o.weight_decay, o.decay_embeddings) + [
        {**g, "lr": o.lr * cfg.classify.head_lr_mult} for g in param_groups(model.head, o.weight_decay)]


def train_classifier(session: Session, cfg: ClassifyConfig, model: SequenceClassifier, encoded: dict,
                     splits: Splits, tokenizer: Any, predict: Any) -> tuple[dict[str, Any], dict[str, list[int]]] | None:
    """The shared loop with the classification loss; dev accuracy every epoch (or train.eval_every steps)
    picks checkpoints/best, and the run ends on that state. Returns (training summary, the dev predictions
    of the kept state), or None when the folder already holds this finished run."""
    t = cfg.train
    batches = EpochBatches(encoded["train"], splits.data["train"].labels, t.batch_size * t.grad_accum, t.grad_accum,
                           t.seed, pad_id_of(tokenizer))
    max_steps = session.max_steps(batches.steps_per_epoch)
    if session.finished(max_steps):
        return None
    dev = "dev" in splits.data
    dev_preds: dict[int, list[int]] = {}

    def dev_accuracy(model_: nn.Module, step: int) -> dict[str, dict[str, float]]:
        preds = dev_preds[step] = predict(encoded["dev"], _desc(cfg, f"dev at step {step}", len(encoded["dev"])))
        labels = splits.data["dev"].labels
        return {"dev": {"accuracy": sum(p == y for p, y in zip(preds, labels)) / len(labels),
                        "epoch": step / batches.steps_per_epoch}}

    result = session.fit(model, classification_loss, batches, max_steps=max_steps,
                         steps_per_epoch=batches.steps_per_epoch, evaluate=dev_accuracy if dev else None,
                         select="dev.accuracy", mode="max", groups=head_groups(cfg, model), trainable_only=True,
                         flops_per_token=model.backbone.flops_per_token(cfg.data.max_len), tokenizer=tokenizer)
    p = result.progress
    kept = session.end_on_best(model, result, evaluated=dev)
    summary = session.summary(model, result, best_step=kept, epochs=p.step / batches.steps_per_epoch,
                              examples_per_s=p.step * t.batch_size * t.grad_accum / max(p.elapsed_s, 1e-9))
    return summary, ({"dev": dev_preds[kept]} if kept in dev_preds else {})


def _desc(cfg: ClassifyConfig, split: str, n: int) -> str:
    """The progress bar's label (empty = no bar, with logging.progress=false)."""
    return f"{cfg.classify.method} {split} ({n} examples)" if cfg.logging.progress else ""


def _head_predictor(cfg: ClassifyConfig, model: SequenceClassifier, tokenizer, precision):
    pad = pad_id_of(tokenizer)
    return lambda seqs, desc="": predict_logits(model, seqs, pad, cfg.classify.eval_batch_size, precision,
                                                desc).argmax(-1).tolist()


def _zero_shot_predictor(cfg: ClassifyConfig, model: nn.Module, tokenizer, precision):
    verbalizers = zero_shot_verbalizers(cfg, tokenizer)
    pad = pad_id_of(tokenizer)
    return lambda seqs, desc="": zero_shot_scores(model, seqs, verbalizers, pad, cfg.classify.eval_batch_size,
                                                  precision, cfg.classify.score, desc).argmax(-1).tolist()


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


def _line(out: Path, r: dict[str, Any]) -> str:
    parts = [f"{s} acc {r[s]['accuracy']:.3f} macro-F1 {r[s]['macro_f1']:.3f}" for s in SPLITS
             if s in r and "accuracy" in r[s]]
    cut = ", ".join(f"{k} {v}" for k, v in r["truncated"].items() if v)
    return (f"{out}: {r['method']} seed {r['seed']}: {'; '.join(parts)} (wall {r['wall_time_s']:.0f} s"
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
        return run_one(cfg)
    runs = []
    for seed in seeds:
        c = cfg.model_copy(deep=True)
        c.train.seed, c.out_dir = seed, str(out / f"seed_{seed}")
        runs.append(run_one(c))
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


