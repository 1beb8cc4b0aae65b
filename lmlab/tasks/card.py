"""The pipeline's report card: every stage's model measured the same way, in one Markdown file with the plots.

Per model (the chain's input when it is a pretrained model, then each stage's output): WikiText-2 test
perplexity (seed 001's table: pretrain, SFT, DPO; sliding windows, lmlab/evaluation/evaluate.py), Alpaca
conditional perplexity (response | instruction on the SFT stage's own test split, lmlab/tasks/sft.py) and
answers to the same prompts. Per stage, from its run folder: wall time, tokens, peak memory, parameters,
the reward model's held-out accuracy, DPO reward accuracy and win rate, the verifier's best-of-N table, plot and AUCs. The measurements go to
card.json, the text to report.md (plots in report/); an existing report is never overwritten without
--force (lmlab/evaluation/report.py's rule).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from lmlab.data.batch import pad_id_of
from lmlab.data.instruct import encode_examples
from lmlab.errors import DataError
from lmlab.evaluation.evaluate import sliding_window_perplexity
from lmlab.evaluation.plots import plot_run_curve, read_metrics
from lmlab.evaluation.sweep import markdown_table
from lmlab.fileio import atomic_write_text, read_text
from lmlab.generation.generate import GenerationConfig, generate
from lmlab.paths import data_dir
from lmlab.precision import Precision, resolve_device
from lmlab.schema.pipeline import PipelineBase, ReportSection
from lmlab.tasks.sft import load_splits, make_template, perplexities
from lmlab.train.session import SUMMARY
from lmlab.weights.loading import load_model

REPORT, CARD = "report.md", "card.json"
CHARS_PER_TOKEN = 8
"""Characters of the perplexity text read per token wanted (generous: no tokenizer averages more)."""


def write_card(cfg: PipelineBase, stages: dict[str, Any], record: dict[str, Any], *, force: bool = False) -> Path:
    """Measure every model and write report.md (kept if it exists, unless `force`); returns its path."""
    out = Path(cfg.out_dir)
    path = out / REPORT
    if path.exists() and not force:
        print(f"pipeline: {path} exists; kept (--force rewrites it)")
        return path
    card = measure(cfg, stages, record)
    atomic_write_text(out / CARD, json.dumps(card, indent=2) + "\n")
    atomic_write_text(path, render(cfg, card, stages, record))
    print(f"pipeline: report card {path}")
    return path


# ---------------------------------------------------------------------------------------------------- measuring


def models_of(cfg: PipelineBase, stages: dict[str, Any], record: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, model spec) of every model the card measures, in chain order."""
    first = stages[cfg.stages[0]]
    models = [] if first.model.spec.startswith("preset:") or cfg.stages[0] == "verifier" else \
        [(f"input ({first.model.spec})", first.model.spec)]
    return models + [(name, record[name]["model"]) for name in cfg.stages if record.get(name, {}).get("model")]


def measure(cfg: PipelineBase, stages: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """card.json: per model its perplexities and answers; per stage the facts of its run folder."""
    r = cfg.report
    device = resolve_device("auto")
    precision = Precision(device, "auto" if device.type == "cpu" else "fp32")  # CPU: bf16 where native
    sft = stages.get("sft")
    card: dict[str, Any] = {"models": {}, "stages": {name: stage_facts(name, stages[name], record.get(name, {}))
                                                      for name in cfg.stages}}
    for label, spec in models_of(cfg, stages, record):
        loaded = load_model(spec, device=device, tokenizer=(sft.model.tokenizer or None) if sft else None)
        model, tok = loaded.model.eval(), loaded.tokenizer
        row: dict[str, Any] = {"model": spec, "params": model.num_params()}
        row.update(wikitext_ppl(model, tok, r, device, precision))
        if sft is not None and r.alpaca_records:
            row.update(alpaca_ppl(model, tok, sft, r, precision))
        if r.prompts:
            row["answers"] = answers(model, tok, sft, r)
        card["models"][label] = row
        print(f"pipeline: card: {label}: WikiText-2 ppl {row['wikitext_ppl']:.2f}"
              + (f", Alpaca conditional ppl {row['alpaca_conditional_ppl']:.2f}" if "alpaca_conditional_ppl" in row else ""))
        del model, loaded
    return card


def wikitext_ppl(model: torch.nn.Module, tok: Any, r: ReportSection, device: torch.device,
                 precision: Precision) -> dict[str, Any]:
    """Sliding-window perplexity of the first `ppl_tokens` tokens of the WikiText-2 test text."""
    path = Path(r.wikitext) if r.wikitext else data_dir() / "wikitext-2" / "test.txt"
    text = read_text(path, "report.wikitext text")
    if r.ppl_tokens:
        text = text[: r.ppl_tokens * CHARS_PER_TOKEN]
    ids = tok.encode(text, bos=bool(tok.add_bos and tok.bos_id is not None))
    ids = ids[: r.ppl_tokens] if r.ppl_tokens else ids
    context = min(r.ppl_context, model.config.max_seq_len)
    res = sliding_window_perplexity(model, ids, context, max(1, context // 2), r.batch_size, device,
                                    precision.dtype if precision.dtype_name != "fp32" else None)
    return {"wikitext_ppl": res.ppl, "wikitext_tokens": res.n_tokens, "wikitext_context": context}


def alpaca_ppl(model: torch.nn.Module, tok: Any, sft: Any, r: ReportSection, precision: Precision) -> dict[str, Any]:
    """Conditional (response | instruction) perplexity on the SFT stage's test split (first records)."""
    test = load_splits(sft)[2][: r.alpaca_records]
    examples = encode_examples(test, make_template(sft.data), tok, sft.data.max_len).examples
    if not examples:
        return {}
    ppl = perplexities(model, examples, pad_id_of(tok), r.batch_size, precision)
    return {"alpaca_conditional_ppl": ppl["conditional_ppl"], "alpaca_records": len(examples)}


def answers(model: torch.nn.Module, tok: Any, sft: Any, r: ReportSection) -> list[str]:
    """The model's answers to the report prompts, in the SFT stage's template (Alpaca without one)."""
    template = make_template(sft.data) if sft is not None else None
    prompts = [template.prompt({"instruction": p, "input": "", "output": ""}, tok) if template else p for p in r.prompts]
    gen = GenerationConfig(r.max_new_tokens, r.sampling(), stop_strings=("### Instruction:",), seed=0)
    return [a.strip() for a in generate(model, tok, prompts, gen)]


def stage_facts(name: str, cfg: Any, record: dict[str, Any]) -> dict[str, Any]:
    """What a stage's run folder says: time, tokens, memory, and its own results."""
    out = Path(cfg.out_dir)
    summary = _json(out / SUMMARY)
    train = summary.get("train", summary)  # SFT nests its training summary
    facts = {"wall_s": record.get("wall_s"), "peak_mem_mb": record.get("peak_mem_mb"), "last": record.get("last"),
             "steps": train.get("steps"), "tokens": train.get("tokens_seen"), "train_time_s": train.get("train_time_s"),
             "trainable_params": train.get("trainable_params"), "val_loss": train.get("val_loss")}
    if name == "reward":
        test = summary.get("test", {})
        facts.update({k: test[k] for k in ("accuracy", "shorter_response_baseline") if k in test})
    if name == "dpo":
        facts.update(dpo_facts(summary))
    if name == "verifier":
        samples = _json(out / "samples" / SUMMARY)
        facts["samples"] = samples
        facts["generated_tokens"] = samples.get("generated_tokens")
        facts["eval"] = {k: v for k, v in _json(out / "eval" / "results.json").items() if k != "outcomes"}
        facts["heldout"] = summary.get("heldout")
    return facts


def dpo_facts(summary: dict[str, Any]) -> dict[str, Any]:
    """lmlab dpo's held-out results (lmlab/tasks/dpo.py summary.json): the reference's preference before,
    the policy's implicit-reward accuracy after (each {value, low, high, n}: a Wilson 95% interval), and the
    win rate against the reference under eval.reward_model when the DPO recipe names one."""
    test_before, test_after = summary.get("before", {}).get("test", {}), summary.get("after", {}).get("test", {})
    facts = {"reference_preference": test_before.get("reference_preference"),
             "reward_accuracy": test_after.get("implicit_accuracy"),
             "win_rate": summary.get("generation", {}).get("win_rate")}
    return {k: v for k, v in facts.items() if v is not None}


def _share(v: dict[str, Any] | None) -> str:
    """A share with its Wilson 95% interval, as lmlab dpo reports it."""
    if not v:
        return "n/a"
    return f"{v['value']:.3f} [{v['low']:.3f}, {v['high']:.3f}] on {v['n']}"


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


# ---------------------------------------------------------------------------------------------------- rendering


def render(cfg: PipelineBase, card: dict[str, Any], stages: dict[str, Any], record: dict[str, Any]) -> str:
    """report.md from card.json and the stage folders (plots drawn into report/)."""
    out = Path(cfg.out_dir)
    plots = out / "report"
    parts = [f"# Pipeline report: {out.name}", "", f"Folder: `{out}`; stages: {' -> '.join(cfg.stages)}.", ""]
    rows = []
    for name in cfg.stages:
        f = card["stages"][name]
        rows.append({"stage": name, "steps": f.get("steps"), "train tokens": f.get("tokens"),
                     "generated tokens": f.get("generated_tokens"), "trainable params": f.get("trainable_params"),
                     "wall s": _round(f.get("wall_s")), "peak MB": _round(f.get("peak_mem_mb")),
                     "this run": f.get("last")})
    parts += ["## Stages", "", markdown_table(rows, list(rows[0])), "",
              ("Wall time and peak resident memory are per stage (each stage runs in the pipeline's process with "
               "its peak reset before it); `this run` says whether the last invocation ran or skipped it."), ""]
    mrows = [{"model": label, "params": m.get("params"), "WikiText-2 test ppl": _round(m.get("wikitext_ppl"), 2),
              "Alpaca conditional ppl": _round(m.get("alpaca_conditional_ppl"), 2)} for label, m in card["models"].items()]
    if mrows:
        first = next(iter(card["models"].values()))
        parts += ["## Language modelling", "", markdown_table(mrows, list(mrows[0])), "",
                  (f"WikiText-2: the first {first.get('wikitext_tokens'):,} tokens of the test split, sliding windows "
                   f"of {first.get('wikitext_context')} tokens (stride half), bf16 autocast on CPU. Alpaca: response | "
                   f"instruction on {first.get('alpaca_records', 0)} records of the SFT stage's test split."), ""]
    if "reward" in cfg.stages:
        w = card["stages"]["reward"]
        parts += ["## Reward model", "",
                  f"- held-out pairs, accuracy (chosen scored higher): {_share(w.get('accuracy'))}",
                  f"- length baseline (the shorter response preferred): {_share(w.get('shorter_response_baseline'))}", ""]
    if "dpo" in cfg.stages:
        d = card["stages"]["dpo"]
        parts += ["## DPO", "",
                  f"- held-out pairs, reference preference (chosen more likely) before: {_share(d.get('reference_preference'))}",
                  f"- held-out implicit-reward accuracy after: {_share(d.get('reward_accuracy'))}",
                  "- win rate against the reference under the reward model: " + (_share(d["win_rate"]) if "win_rate" in d
                  else "not measured (add the reward stage, or name a reward run in dpo.eval.reward_model)"), ""]
    if "verifier" in cfg.stages:
        parts += verifier_section(card["stages"]["verifier"], Path(stages["verifier"].out_dir), out)
    curves = []
    for name in cfg.stages:
        run = Path(stages[name].out_dir)
        try:
            curves.append(plot_run_curve(read_metrics(run), "loss", plots / f"loss_{name}.png", f"loss: {name}"))
        except DataError:
            continue
    if curves:
        parts += ["## Training curves", "", *[_image(p, out) for p in curves], ""]
    parts += answers_section(cfg, card)
    return "\n".join(parts)


def verifier_section(f: dict[str, Any], run: Path, out: Path) -> list[str]:
    ev, s = f.get("eval", {}), f.get("samples", {})
    parts = ["## Verifier (GSM8K best-of-N)", ""]
    if s:
        parts += [(f"Training data: {s['samples']} sampled solutions of {s['problems']} problems "
                   f"({s['samples_per_problem']} each), {s['correct_samples']} right ({s['problems_solved']} problems "
                   f"solved at least once), {s['gold']} reference solutions added as positives."), ""]
    table = run / "eval" / "bestofn.md"
    if table.is_file():
        parts += [table.read_text().strip(), ""]
    if (run / "eval" / "bestofn.png").is_file():
        parts += [_image(run / "eval" / "bestofn.png", out), ""]
    held = f.get("heldout") or {}
    parts += [(f"Verifier AUC: held-out training problems' samples {_round(held.get('auc'), 3)} (with their "
               f"reference solutions {_round(held.get('auc_with_gold'), 3)}); test samples "
               f"{_round(ev.get('test_auc'), 3)}. Oracle pass@{ev.get('samples')} bounds every reranker."), ""]
    return parts


def answers_section(cfg: PipelineBase, card: dict[str, Any]) -> list[str]:
    parts = ["## Answers to the same prompts", ""] if cfg.report.prompts else []
    for i, prompt in enumerate(cfg.report.prompts):
        parts += [f"### {prompt}", ""]
        for label, m in card["models"].items():
            answer = (m.get("answers") or [""] * (i + 1))[i] or "(empty)"
            parts += [f"**{label}**:", "", "> " + answer.replace("\n", "\n> "), ""]
    return parts


def _image(path: Path, out: Path) -> str:
    return f"![{path.stem}]({Path(os.path.relpath(path, out)).as_posix()})"


def _round(x: Any, digits: int = 0) -> Any:
    if x is None:
        return "n/a"
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x):
        return x
    return round(x, digits) if digits else round(x)
