"""GSM8K verifier with best-of-N (`lmlab verifier sample|train|eval RECIPE.yaml`), after Cobbe et al. 2021,
"Training Verifiers to Solve Math Word Problems".

sample  the generator writes K solutions for each training problem (prompts prefilled once, their KV cache
        shared by the K samples: lmlab/generation/samples.py); each is labelled by its final answer
        (lmlab.evaluation.metrics.extract_number); the reference solutions join as positives. The labelled
        set is samples/train.jsonl in the run folder.
train   a ScalarHead (lmlab/model/heads.py) on the backbone, LoRA + head or every weight, trained through the
        training session with `verifier_loss` (a value per solution token or per solution, optionally with
        the LM loss); problems held out of training give the AUC every evaluation and pick the kept state.
eval    on seeded test problems: greedy pass@1, majority vote, verifier best-of-N, verifier-weighted vote and
        the oracle pass@N for each N (lmlab/evaluation/bestofn.py), one table, one plot, AUC on held-out and
        on test samples, paired tests.

Run folder: samples/{train.jsonl, meta.json, summary.json}, config.yaml, metrics.jsonl, checkpoints/,
summary.json (training), verifier/ (adapter + head, or weights + head, and verifier.json),
eval/{test_samples.jsonl, meta.json, scores.jsonl, results.json, bestofn.md, bestofn.png}.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmlab.adapters.files import load_adapter, save_lora
from lmlab.adapters.lora import apply_lora, merge_lora
from lmlab.data.batch import pad_id_of
from lmlab.data.instruct import Record, Template
from lmlab.data.tasks import gsm8k_records
from lmlab.data.verifier import (
    LabelledBatches,
    LabelledExample,
    Solution,
    encode_solutions,
    labelled_eval_batches,
    read_solutions,
    write_solutions,
)
from lmlab.errors import ConfigError
from lmlab.evaluation.bestofn import LABELS, METHODS, ProblemSamples, best_of_n, markdown
from lmlab.evaluation.metrics import canonical_number, extract_number, roc_auc
from lmlab.evaluation.plots import plot_lines
from lmlab.evaluation.scoring import predict_logits
from lmlab.fileio import FolderLock, atomic_write, atomic_write_text
from lmlab.generation.generate import GenerationConfig, encode_prompt
from lmlab.generation.samples import sample_texts
from lmlab.model.heads import ScalarHead
from lmlab.paths import data_dir
from lmlab.precision import Precision, inference_dtype, peak_memory_mb, resolve_device
from lmlab.schema.load import to_dict
from lmlab.schema.verifier import VerifierConfig
from lmlab.tasks.sft import json_summary, make_template
from lmlab.train.losses import verifier_loss
from lmlab.train.optim import param_groups
from lmlab.train.session import SUMMARY, Session, check_run_folder
from lmlab.weights.checkpoint import save_checkpoint
from lmlab.weights.loading import load_model

STOP_STRINGS = ("### Instruction:",)
"""An Alpaca-style generator that runs on writes the next instruction: cut there."""
META, VERIFIER_META, HEAD_WEIGHTS = "meta.json", "verifier.json", "head.safetensors"


# ---------------------------------------------------------------------------------------------------- problems


def problems(path: str, n: int, seed: int, split: str = "train") -> list[tuple[int, Record]]:
    """(line index, record) of a seeded subset of n GSM8K problems (0 = all), in file order; an empty path
    is the shared data folder's gsm8k/<split>.jsonl."""
    records = gsm8k_records(path or data_dir() / "gsm8k" / f"{split}.jsonl")
    chosen = sorted(random.Random(seed).sample(range(len(records)), n)) if 0 < n < len(records) else range(len(records))
    return [(i, records[i]) for i in chosen]


def label(text: str, reference: str) -> tuple[str | None, bool]:
    """(extracted final answer, whether it equals the reference answer)."""
    answer = extract_number(text)
    return answer, answer is not None and answer == canonical_number(reference.replace(" ", ""))


def heldout_problems(ids: Sequence[int], share: float, seed: int) -> set[int]:
    """The seeded share of problem ids whose solutions the verifier never trains on."""
    ids = sorted(set(ids))
    return set(random.Random(seed + 1).sample(ids, round(share * len(ids)))) if share and len(ids) > 1 else set()


def sample_seeds(seed: int, problem_ids: Sequence[int], k: int) -> list[list[int]]:
    """The seed of sample k of problem i: a function of (seed, i, k) alone, so reruns and other batchings
    give the same solutions."""
    return [[seed * 1_000_003 + i * 1_009 + j for j in range(k)] for i in problem_ids]


# ---------------------------------------------------------------------------------------------------- generator


def load_generator(cfg: VerifierConfig, device: torch.device) -> tuple[nn.Module, Any]:
    """The generator in its inference dtype, with its adapter merged into the weights (decoding then costs
    what the base costs)."""
    g = cfg.generator
    loaded = load_model(g.spec, device=device, dtype=torch.float32, tokenizer=g.tokenizer or None)
    if loaded.tokenizer is None:
        raise ConfigError(f"generator.spec={g.spec!r} carries no tokenizer: set generator.tokenizer")
    model = loaded.model
    if g.adapter:
        load_adapter(model, g.adapter)
        merge_lora(model)
    return model.to(inference_dtype(g.dtype, device)).eval(), loaded.tokenizer


def solve(model: nn.Module, tokenizer: Any, template: Template, items: Sequence[tuple[int, Record]],
                       cfg: VerifierConfig, k: int, seed: int, greedy: bool = False) -> list[list[str]]:
    """K sampled (or one greedy) solution texts per problem."""
    g = cfg.generator
    sampling = g.sampling().model_copy(update={"temperature": 0.0}) if greedy else g.sampling()
    gen = GenerationConfig(g.max_new_tokens, sampling, stop_strings=STOP_STRINGS)
    prompts = [encode_prompt(tokenizer, template.prompt(rec, tokenizer)) for _, rec in items]
    seeds = sample_seeds(seed, [i for i, _ in items], k)
    return sample_texts(model, tokenizer, prompts, gen, k, seeds, batch_prompts=max(1, g.batch_size // k))


PROMPT_KEYS = ("template", "custom_template", "response_marker", "system")


def _meta(cfg: VerifierConfig, part: str) -> dict[str, Any]:
    """What a sample file depends on: the generator, the problems and the prompt format (not how the
    verifier trains on it)."""
    d = to_dict(cfg)
    data = [*PROMPT_KEYS, "train_path", "problems", "gold", "seed"] if part == "train" else [*PROMPT_KEYS, "test_path"]
    keep = {"generator": d["generator"], "data": {k: d["data"][k] for k in data}}
    if part == "test":
        keep["eval"] = {k: d["eval"][k] for k in ("problems", "samples", "greedy", "seed")}
    return keep


def _changed(path: Path, want: dict[str, Any]) -> list[str] | None:
    """The settings in `want` that the sample file's meta.json records differently; None without one."""
    if not path.is_file():
        return None
    have = json.loads(path.read_text())
    return sorted(f"{s}.{k}" for s in want for k in want[s] if want[s][k] != have.get(s, {}).get(k))


def _check_meta(path: Path, want: dict[str, Any], what: str) -> bool:
    """True when `path` holds the meta of these settings; a different one is an error naming the keys."""
    changed = _changed(path, want)
    if changed:
        raise ConfigError(f"{path.parent}: holds {what} made with other settings ({', '.join(changed[:8])}); "
                          "use another out_dir (or the same settings)")
    return changed is not None


# ---------------------------------------------------------------------------------------------------- sample


@contextlib.contextmanager
def _locked(folder: str | Path) -> Iterator[None]:
    """The run folder's lock (the one the training session takes) around sampling and evaluation; as the
    session does, a folder of someone else's files is refused first."""
    check_run_folder(Path(folder))
    lock = FolderLock(folder)
    try:
        yield
    finally:
        lock.release()


def run_sample(cfg: VerifierConfig) -> dict[str, Any]:
    """Sample and label the training solutions (samples/train.jsonl); skipped when they exist."""
    out = Path(cfg.out_dir) / "samples"
    if _check_meta(out / META, _meta(cfg, "train"), "labelled samples"):
        print(f"{out}: labelled samples exist; nothing to do")
        return json.loads((out / SUMMARY).read_text())
    with _locked(cfg.out_dir):
        t0 = time.perf_counter()
        device = resolve_device(cfg.precision.device)
        template = make_template(cfg.data)
        items = problems(cfg.data.train_path, cfg.data.problems, cfg.data.seed)
        model, tok = load_generator(cfg, device)
        texts = solve(model, tok, template, items, cfg, cfg.generator.samples, cfg.generator.seed)
        solutions = []
        for (i, rec), group in zip(items, texts):
            reference = rec["answers"][0]
            for k, text in enumerate(group):
                answer, right = label(text, reference)
                solutions.append(Solution(i, k, "sample", text, answer, reference, right))
            if cfg.data.gold:
                solutions.append(Solution(i, -1, "gold", rec["output"], canonical_number(reference.replace(" ", "")),
                                          reference, True))
        sampled = [s for s in solutions if s.source == "sample"]
        solved = {s.problem for s in sampled if s.correct}
        summary = {"problems": len(items), "samples_per_problem": cfg.generator.samples, "samples": len(sampled),
                   "correct_samples": sum(s.correct for s in sampled),
                   "sample_accuracy": sum(s.correct for s in sampled) / max(len(sampled), 1),
                   "problems_solved": len(solved), "no_answer": sum(s.answer is None for s in sampled),
                   "gold": sum(s.source == "gold" for s in solutions),
                   "generated_tokens": sum(len(tok.encode(s.solution)) for s in sampled),
                   "wall_time_s": time.perf_counter() - t0, "peak_mem_mb": peak_memory_mb(device)}
        summary["tokens_per_s"] = summary["generated_tokens"] / summary["wall_time_s"]
        save_labelled(cfg, solutions, summary)
    print(f"{out}: {summary['samples']} samples of {summary['problems']} problems, {summary['correct_samples']} right "
          f"({summary['problems_solved']} problems solved), {summary['wall_time_s']:.0f} s "
          f"({summary['tokens_per_s']:.0f} tokens/s)")
    return summary


def save_labelled(cfg: VerifierConfig, solutions: Sequence[Solution], summary: dict[str, Any]) -> None:
    """samples/train.jsonl, its summary, and last the settings it was made with (meta.json: a set without
    one is incomplete)."""
    out = Path(cfg.out_dir) / "samples"
    write_solutions(out / "train.jsonl", solutions)
    atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / META, json.dumps(_meta(cfg, "train"), indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------- train


def build_verifier(cfg: VerifierConfig, backbone: nn.Module) -> ScalarHead:
    """Backbone + scalar head (per-token values); LoRA adapters with the head trainable beside them."""
    model = ScalarHead(backbone, per_token=True, dropout=cfg.verifier.dropout)
    if cfg.verifier.method == "lora":
        apply_lora(model, cfg.lora.model_copy(update={"trainable": [*cfg.lora.trainable, "head"]}))
    return model


def split_examples(cfg: VerifierConfig, solutions: list[Solution], examples: list[LabelledExample]
                   ) -> tuple[list[LabelledExample], list[tuple[Solution, LabelledExample]]]:
    """Training examples, and the held-out problems' (solution, example) pairs."""
    held = heldout_problems([s.problem for s in solutions], cfg.data.heldout, cfg.data.seed)
    train = [e for s, e in zip(solutions, examples) if s.problem not in held]
    return train, [(s, e) for s, e in zip(solutions, examples) if s.problem in held]


def scores_of(model: ScalarHead, examples: Sequence[LabelledExample], pad_id: int, batch_size: int,
              precision: Precision) -> list[float]:
    """The verifier's score (the value at the last token, a logit) of each example, in order."""
    pooled = _Pooled(model).train(model.training)  # predict_logits restores the mode it finds
    seqs = [e.ids for e in examples]
    return predict_logits(pooled, seqs, pad_id, batch_size, precision).tolist() if seqs else []


class _Pooled(nn.Module):
    """The head's last-token score (B,) whatever its per_token setting (what predict_logits stacks)."""

    def __init__(self, model: ScalarHead) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(ids, mask, per_token=False)


def auc_metrics(scores: Sequence[float], pairs: Sequence[tuple[Solution, Any]]) -> dict[str, float]:
    """AUC over sampled solutions (the verifier's real job) and with the reference solutions too."""
    out = {}
    sampled = [(x, s.correct) for x, (s, _) in zip(scores, pairs) if s.source == "sample"]
    auc = roc_auc([x for x, _ in sampled], [y for _, y in sampled])
    if auc is not None:
        out["auc"] = auc
    with_gold = roc_auc(list(scores), [s.correct for s, _ in pairs])
    if with_gold is not None:
        out["auc_with_gold"] = with_gold
    return out


def run_train(cfg: VerifierConfig) -> dict[str, Any]:
    """Train the verifier on the labelled set (through the training session); returns the summary."""
    samples = Path(cfg.out_dir) / "samples"
    if not _check_meta(samples / META, _meta(cfg, "train"), "labelled samples"):
        raise ConfigError(f"{samples}: no labelled samples for these settings; run `lmlab verifier sample` first")
    solutions = read_solutions(samples / "train.jsonl")
    with Session(cfg) as session:
        loaded = load_model(cfg.backbone_spec, device=session.device, tokenizer=cfg.model.tokenizer or
                            cfg.generator.tokenizer or None, overrides=cfg.model.overrides)
        tok = loaded.tokenizer
        if tok is None:
            raise ConfigError(f"model.spec={cfg.backbone_spec!r} carries no tokenizer: set model.tokenizer")
        records = dict(problems(cfg.data.train_path, 0, cfg.data.seed))
        examples, cut = encode_solutions(solutions, records, make_template(cfg.data), tok, cfg.data.max_len)
        train, held = split_examples(cfg, solutions, examples)
        t, v, pad = cfg.train, cfg.verifier, pad_id_of(tok)
        lm = v.lm_coef > 0
        batches = LabelledBatches(train, t.batch_size, t.grad_accum, t.seed, pad, v.target, lm)
        max_steps = session.max_steps(batches.steps_per_epoch)
        if session.finished(max_steps):
            return json_summary(session)
        model = build_verifier(cfg, loaded.model).to(session.device)

        def heldout_auc(model_: nn.Module, step: int) -> dict[str, dict[str, float]]:
            scores = scores_of(model, [e for _, e in held], pad, v.eval_batch_size, session.precision)
            return {"heldout": auc_metrics(scores, held)}

        o = cfg.optim
        groups = param_groups(model.backbone, o.weight_decay, o.decay_embeddings) + [
            {**g, "lr": o.lr * v.head_lr_mult} for g in param_groups(model.head, o.weight_decay)]
        result = session.fit(model, partial(verifier_loss, lm_coef=v.lm_coef), batches, max_steps=max_steps,
                             steps_per_epoch=batches.steps_per_epoch,
                             val_data=labelled_eval_batches([e for _, e in held], v.eval_batch_size, pad, v.target, lm),
                             evaluate=heldout_auc if held else None, select="heldout.auc", mode="max", groups=groups,
                             trainable_only=v.method == "lora",
                             flops_per_token=model.backbone.flops_per_token(cfg.data.max_len), tokenizer=tok)
        kept = session.end_on_best(model, result, evaluated=bool(held))
        heldout = auc_metrics(scores_of(model, [e for _, e in held], pad, v.eval_batch_size, session.precision), held)
        save_verifier(cfg, model, tok, session.out / "verifier")
        summary = session.summary(model, result, kept_step=kept, heldout=heldout, truncated=cut,
                                  examples={"train": len(train), "heldout": len(held),
                                            "train_positive": sum(e.label > 0 for e in train),
                                            "heldout_problems": len({e.problem for _, e in held})})
        return session.finish(summary, line=f"{session.out}: verifier trained {result.progress.step} steps (kept "
                              f"step {kept}), held-out AUC {_fmt(heldout.get('auc'))} (with gold "
                              f"{_fmt(heldout.get('auc_with_gold'))}), train_loss {result.train_loss:.4f}")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def save_verifier(cfg: VerifierConfig, model: ScalarHead, tokenizer: Any, folder: Path) -> None:
    """LoRA: the adapter with the head (lmlab/adapters/files.py); full: an lmlab checkpoint of the backbone
    plus head.safetensors. verifier.json says how to rebuild and prompt it."""
    from safetensors.torch import save_file

    if cfg.verifier.method == "lora":
        save_lora(model, folder / "adapter")
    else:
        save_checkpoint(model.backbone, folder / "model", tokenizer=tokenizer)
        head = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
        atomic_write(folder / HEAD_WEIGHTS, lambda tmp: save_file(head, str(tmp)))
    meta = {"method": cfg.verifier.method, "model": cfg.backbone_spec, "tokenizer": cfg.model.tokenizer or
            cfg.generator.tokenizer, "target": cfg.verifier.target, "data": to_dict(cfg.data)}
    atomic_write_text(folder / VERIFIER_META, json.dumps(meta, indent=2) + "\n")


def load_verifier(folder: str | Path, device: torch.device) -> tuple[ScalarHead, Any]:
    """A saved verifier in eval mode, and its tokenizer."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / VERIFIER_META).is_file():
        raise ConfigError(f"{folder}: no trained verifier ({VERIFIER_META} missing); run `lmlab verifier train` first")
    meta = json.loads((folder / VERIFIER_META).read_text())
    spec = meta["model"] if meta["method"] == "lora" else folder / "model"
    loaded = load_model(spec, device=device, tokenizer=meta["tokenizer"] or None)
    model = ScalarHead(loaded.model)
    if meta["method"] == "lora":
        load_adapter(model, folder / "adapter")
    else:
        model.head.load_state_dict(load_file(str(folder / HEAD_WEIGHTS)))
    return model.to(device).eval(), loaded.tokenizer


# ---------------------------------------------------------------------------------------------------- eval


def test_solutions(cfg: VerifierConfig, items: list[tuple[int, Record]], device: torch.device) -> list[dict[str, Any]]:
    """Greedy and K sampled solutions per test problem, labelled; cached in eval/test_samples.jsonl."""
    out = Path(cfg.out_dir) / "eval"
    meta = _meta(cfg, "test")
    cache = out / "test_samples.jsonl"
    if cache.is_file() and _changed(out / META, meta) == []:  # other settings: sampled again
        return [json.loads(line) for line in cache.read_text().splitlines()]
    model, tok = load_generator(cfg, device)
    template = make_template(cfg.data)
    e = cfg.eval
    t0 = time.perf_counter()
    sampled = solve(model, tok, template, items, cfg, e.samples, e.seed)
    greedy = solve(model, tok, template, items, cfg, 1, e.seed, greedy=True) if e.greedy else None
    rows = []
    for j, ((i, rec), texts) in enumerate(zip(items, sampled)):
        reference = rec["answers"][0]
        labelled = [label(x, reference) for x in texts]
        row = {"problem": i, "reference": reference, "solutions": texts, "answers": [a for a, _ in labelled],
               "correct": [c for _, c in labelled]}
        if greedy is not None:
            row["greedy"] = greedy[j][0]
            row["greedy_correct"] = label(greedy[j][0], reference)[1]
        rows.append(row)
    atomic_write_text(out / "generation.json", json.dumps({"seconds": time.perf_counter() - t0}) + "\n")
    atomic_write_text(cache, "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_text(out / META, json.dumps(meta, indent=2) + "\n")
    del model
    return rows


def run_eval(cfg: VerifierConfig) -> dict[str, Any]:
    """Best-of-N on the test problems with the trained verifier (eval/results.json, bestofn.md/png)."""
    out = Path(cfg.out_dir)
    if not (out / SUMMARY).is_file():
        raise ConfigError(f"{out}: no trained verifier (summary.json missing); run `lmlab verifier train` first")
    with _locked(out):
        t0 = time.perf_counter()
        device = resolve_device(cfg.precision.device)
        precision = Precision(device, cfg.precision.dtype)
        items = problems(cfg.data.test_path, cfg.eval.problems, cfg.eval.seed, "test")
        rows = test_solutions(cfg, items, device)
        verifier, tok = load_verifier(out / "verifier", device)
        template, records = make_template(cfg.data), dict(items)
        pad, bs = pad_id_of(tok), cfg.verifier.eval_batch_size
        flat = [Solution(r["problem"], k, "sample", x, a, r["reference"], c)
                for r in rows for k, (x, a, c) in enumerate(zip(r["solutions"], r["answers"], r["correct"]))]
        examples, _ = encode_solutions(flat, records, template, tok, cfg.data.max_len)
        scores = scores_of(verifier, examples, pad, bs, precision)
        K = cfg.eval.samples
        per_problem = [ProblemSamples(r["answers"], r["correct"], scores[j * K : (j + 1) * K], r.get("greedy_correct", False))
                       for j, r in enumerate(rows)]
        result = best_of_n(per_problem, cfg.eval.n, cfg.eval.subsets, cfg.eval.seed)
        result["test_auc"] = roc_auc(scores, [s.correct for s in flat])
        result["heldout"] = json.loads((out / SUMMARY).read_text()).get("heldout", {})  # the kept state's
        result["settings"] = to_dict(cfg.eval)
        result["wall_time_s"] = time.perf_counter() - t0
        result["generation_s"] = json.loads((out / "eval" / "generation.json").read_text())["seconds"]
        atomic_write_text(out / "eval" / "scores.jsonl", "".join(
            json.dumps({"problem": r["problem"], "scores": scores[j * K : (j + 1) * K]}) + "\n" for j, r in enumerate(rows)))
        table = markdown(result)
        atomic_write_text(out / "eval" / "bestofn.md", table + "\n")
        plot_best_of_n(result, out / "eval" / "bestofn.png")
        atomic_write_text(out / "eval" / "results.json", json.dumps(result, indent=2) + "\n")
    print(table)
    print(f"{out}: test AUC {_fmt(result['test_auc'])}, held-out AUC {_fmt(result['heldout'].get('auc'))}; "
          f"eval {result['wall_time_s']:.0f} s")
    return result


def plot_best_of_n(result: dict[str, Any], path: Path) -> Path:
    """Accuracy against N for each method (greedy pass@1 as a flat reference line)."""
    ns, acc = result["n"], result["accuracy"]
    lines = {LABELS[m]: (ns, acc[m]) for m in ("greedy", *METHODS, "oracle")}
    return plot_lines(lines, path, title=f"GSM8K best-of-N ({result['problems']} test problems)", xlabel="N samples",
                      ylabel="accuracy", markers=True)


def run_verifier(cfg: VerifierConfig) -> dict[str, Any]:
    """sample -> train -> eval (each skipped when its results are there); the summary with the eval results."""
    run_sample(cfg)
    summary = run_train(cfg)
    results = Path(cfg.out_dir) / "eval" / "results.json"
    evaluated = json.loads(results.read_text()) if results.is_file() else None
    if evaluated is None or evaluated.get("settings") != to_dict(cfg.eval):
        evaluated = run_eval(cfg)
    else:
        print(f"{results}: evaluated with these settings; nothing to do")
    return {**summary, "eval": {k: v for k, v in evaluated.items() if k != "outcomes"}}
