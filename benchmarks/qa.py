"""QA task adapters on SmolLM2-135M-Instruct (seed 004): MCQ (MMLU + ARC-Challenge) and SAQ (NQ-open).

For each task: train the adapter with the SFT path (`recipes/qa/*.yaml`; --max-train caps it), then on
the recipe's test split (capped) measure the MCQ zero-shot baselines (letter log-probability, and cloze:
each option's own text scored, the model's knowledge without the letter format), the base model's
generated answers and the adapter's, each with validation and retries: accuracy or EM/F1, the share of
outputs valid at once, valid after retry, and still invalid, and McNemar's paired test of the adapter
against each baseline on the same questions.

    python benchmarks/qa.py --max-train 0 --max-eval 0     # README numbers (2 cores: 25 + 15 min)
    python benchmarks/qa.py --mcq-run runs/qa-mcq --saq-run runs/qa-saq --max-eval 200
    python benchmarks/qa.py --mcq-run runs/bench-qa-mcq --saq-run runs/bench-qa-saq --reuse \
        --variant "options rotated x2=runs/bench-qa-perm2-mcq"    # table only, with a variant run's rows
Writes the section "## QA adapters" of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from sft_alpaca import write_section  # noqa: E402

HEADING = "## QA adapters"
RECIPES = {"mcq": "recipes/qa/mcq-smollm2.yaml", "saq": "recipes/qa/saq-smollm2.yaml"}


def train(task: str, out: str, max_train: int, epochs: float | None, model: list[str]) -> Path:
    from lmlab.tasks.sft import run_recipe

    epochs_override = [f"train.epochs={epochs}"] if epochs is not None else []
    run_recipe(RECIPES[task], [f"out_dir={out}", f"data.max_train={max_train}", *epochs_override,
                               "logging.progress=false", *model])
    return Path(out)


def ci95(p: float, n: int) -> float:
    """Half-width of the normal-approximation 95% interval of a proportion p measured on n items."""
    return 1.96 * math.sqrt(p * (1 - p) / max(n, 1))


def rows(task: str, res: dict, run: Path, variant: str = "") -> list[str]:
    """Table rows of one evaluation: baselines and adapter, or (a `variant` run) only its adapter's rows."""
    s = json.loads((run / "summary.json").read_text())
    t = s["train"]
    trained = (f"{s['data']['train']['examples']} records, {t['steps']} steps, {t['train_time_s'] / 60:.0f} min, "
               f"val loss {t['val_loss']:.3f}")
    metric = "accuracy" if task == "mcq" else "exact_match"
    prefix = f"{variant}: " if variant else ""
    out = []
    if task == "mcq":
        for name, label in (("zero_shot_logprob", "zero-shot letter log-prob (no adapter)"),
                            ("zero_shot_cloze", "zero-shot cloze, option text log-prob (no adapter)"),
                            ("adapter_logprob", f"{prefix}adapter, letter log-prob")):
            if name not in res or (variant and name != "adapter_logprob"):  # old evaluations lack the cloze
                continue
            z = res[name]
            norm = f"; per-char {z['accuracy_norm']:.3f}" if "accuracy_norm" in z else ""
            out.append(f"| mcq (n={z['n']}) | {label} | {z['accuracy']:.3f} ± {ci95(z['accuracy'], z['n']):.3f} "
                       f"(MMLU {z.get('accuracy_mmlu', float('nan')):.3f}, ARC {z.get('accuracy_arc', float('nan')):.3f}{norm})"
                       " | - | - | - | - |")
    for name, label in (("base_0shot", "base model, generated"), ("adapter", f"{prefix}LoRA adapter ({trained})")):
        if variant and name != "adapter":
            continue
        r = res[name]
        score = f"{r[metric]:.3f} ± {ci95(r[metric], r['n']):.3f}" + (f" / F1 {r['f1']:.3f}" if task == "saq" else "")
        if "accuracy_mmlu" in r:
            score += f" (MMLU {r['accuracy_mmlu']:.3f}, ARC {r.get('accuracy_arc', float('nan')):.3f})"
        out.append(f"| {task} (n={r['n']}) | {label} | {score} | {r['valid_first_try']:.3f} "
                   f"| {r['valid_after_retry']:.3f} | {r['needed_retry']:.3f} | {r['invalid']:.3f} |")
    return out


def evaluation(task: str, run: Path, args: argparse.Namespace, model: list[str]) -> dict:
    """The run's saved qa_eval.json with --reuse, else a fresh evaluation on the recipe's test split."""
    from lmlab.fileio import atomic_write_text
    from lmlab.tasks.task_eval import evaluate_recipe

    if args.reuse and (run / "qa_eval.json").is_file():
        return json.loads((run / "qa_eval.json").read_text())
    res = evaluate_recipe(RECIPES[task], [f"data.max_eval={args.max_eval}", *model], str(run / "adapters" / task),
                          args.retries)
    atomic_write_text(run / "qa_eval.json", json.dumps(res, indent=2) + "\n")
    return res


def paired(res: dict) -> list[str]:
    """McNemar's exact test of the adapter's generated answers against each zero-shot baseline, on the
    same questions (needs the per-item results that evaluations record)."""
    from lmlab.evaluation.metrics import mcnemar

    out = []
    for name, label in (("zero_shot_logprob", "zero-shot letter log-prob"), ("zero_shot_cloze", "zero-shot cloze")):
        if "correct" in res.get(name, {}) and "correct" in res.get("adapter", {}):
            m = mcnemar(res["adapter"]["correct"], res[name]["correct"])
            out.append(f"Adapter vs {label}, paired on the same {len(res['adapter']['correct'])} questions: "
                       f"{m['a_only']} right only with the adapter, {m['b_only']} only zero-shot; "
                       f"McNemar exact p = {m['p']:.3f}.")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="mcq,saq")
    ap.add_argument("--mcq-run", default="")
    ap.add_argument("--saq-run", default="")
    ap.add_argument("--max-train", type=int, default=96)
    ap.add_argument("--epochs", type=float, default=None, help="default: the recipe's")
    ap.add_argument("--max-eval", type=int, default=60)
    ap.add_argument("--retries", type=int, default=2)
    ap.add_argument("--runs", default="runs/bench-qa-", help="prefix of the run folders it trains (+ task name)")
    ap.add_argument("--reuse", action="store_true", help="use a run's saved qa_eval.json instead of evaluating again")
    ap.add_argument("--model", default="", help="base model spec (default: the recipes' SmolLM2)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training recipe override")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=RUN",
                    help="another trained run (adapters/<task>/ inside) scored on the same test split, its rows "
                         "labelled LABEL and paired against the main run's zero-shot baselines")
    ap.add_argument("--results", default=str(Path(__file__).parent / "RESULTS.md"), help="results file to update")
    args = ap.parse_args()
    model = [f"model.spec={args.model}"] if args.model else []
    lines = ["| task | model | accuracy or EM (± 95% CI) | valid at once | valid after retry | needed retry | invalid |",
             "|---|---|---:|---:|---:|---:|---:|"]
    notes: list[str] = []
    if bad := [v for v in args.variant if "=" not in v]:
        ap.error(f"--variant {bad[0]!r}: expected LABEL=RUN_FOLDER")
    variants = [v.rsplit("=", 1) for v in args.variant]
    for task in args.tasks.split(","):
        run = Path(getattr(args, f"{task}_run") or train(task, f"{args.runs}{task}", args.max_train, args.epochs,
                                                                  model + args.set))
        res = evaluation(task, run, args, model)
        lines += rows(task, res, run)
        if task == "mcq":
            picked = {k: res[k]["picked"] for k in ("zero_shot_logprob", "adapter_logprob")}
            notes.append(f"MCQ letters picked by log-prob: zero-shot {picked['zero_shot_logprob']}, adapter "
                         f"{picked['adapter_logprob']}; correct answers {res['zero_shot_logprob']['answers']}. "
                         "An MCQ answer is two tokens (the letter, end of turn): a letter at chance with a sure end "
                         "gives a validation loss of ln 4 / 2 = 0.693.")
        notes += paired(res)
        for label, vrun in variants:
            vrun = Path(vrun)
            if (vrun / "adapters" / task).is_dir():
                vres = evaluation(task, vrun, args, model)
                lines += rows(task, vres, vrun, variant=label)
                notes += [f"{label}: {n}" for n in paired(vres | {k: res[k] for k in res if k.startswith("zero_shot")})]
                if task == "mcq":
                    notes.append(f"{label}: letters picked by log-prob {vres['adapter_logprob']['picked']}.")
        print("\n".join(lines + notes), flush=True)
    note = ("SmolLM2-135M-Instruct on CPU, bf16 autocast; adapters trained with the recipes in recipes/qa/ on "
            "the training part of the seeded 5:1:1 split (records and steps in each row), scored on its test part "
            f"(n per row); greedy first answer, then up to {args.retries} retries (new seed each, temperature 0.7, "
            "top-p 0.9) while the validator rejects the output."
            + (" Variant rows are runs trained the same way with one change, named in the row "
               "(`python benchmarks/qa.py --tasks mcq --max-train 0 --max-eval 0 --runs PREFIX --set KEY=VALUE "
               "[--epochs N]`), scored with `--variant LABEL=RUN`." if variants else ""))
    write_section(note + "\n\n" + "\n".join(lines) + "".join(f"\n\n{n}" for n in notes), HEADING, Path(args.results))


if __name__ == "__main__":
    main()
