"""QA task adapters on SmolLM2-135M-Instruct (seed 004): MCQ (MMLU + ARC-Challenge) and SAQ (NQ-open).

For each task: train the adapter with the SFT path (`recipes/qa/*.yaml`; --max-train caps it), then on
the recipe's test split (capped) measure the zero-shot letter log-probability baseline (MCQ), the base
model's generated answers and the adapter's, each with validation and retries: accuracy or EM/F1, and
the share of outputs valid at once, valid after retry, and still invalid.

    python benchmarks/qa.py --max-train 0 --max-eval 0     # README numbers (2 cores: 25 + 15 min)
    python benchmarks/qa.py --mcq-run runs/qa-mcq --saq-run runs/qa-saq --max-eval 200
    python benchmarks/qa.py --mcq-run runs/bench-qa-mcq --saq-run runs/bench-qa-saq --reuse   # table only
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


def rows(task: str, res: dict, run: Path) -> list[str]:
    s = json.loads((run / "summary.json").read_text())
    t = s["train"]
    trained = f"{s['data']['train']['examples']} records, {t['steps']} steps, {t['train_time_s'] / 60:.0f} min"
    metric = "accuracy" if task == "mcq" else "exact_match"
    out = []
    if task == "mcq":
        for name, label in (("zero_shot_logprob", "zero-shot letter log-prob (no adapter)"),
                            ("adapter_logprob", "adapter, letter log-prob")):
            z = res[name]
            out.append(f"| mcq (n={z['n']}) | {label} | {z['accuracy']:.3f} ± {ci95(z['accuracy'], z['n']):.3f} "
                       f"(MMLU {z.get('accuracy_mmlu', float('nan')):.3f}, ARC {z.get('accuracy_arc', float('nan')):.3f})"
                       " | - | - | - | - |")
    for name, label in (("base_0shot", "base model, generated"), ("adapter", f"LoRA adapter ({trained})")):
        r = res[name]
        score = f"{r[metric]:.3f} ± {ci95(r[metric], r['n']):.3f}" + (f" / F1 {r['f1']:.3f}" if task == "saq" else "")
        out.append(f"| {task} (n={r['n']}) | {label} | {score} | {r['valid_first_try']:.3f} "
                   f"| {r['valid_after_retry']:.3f} | {r['needed_retry']:.3f} | {r['invalid']:.3f} |")
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
    ap.add_argument("--results", default=str(Path(__file__).parent / "RESULTS.md"), help="results file to update")
    args = ap.parse_args()
    model = [f"model.spec={args.model}"] if args.model else []
    from lmlab.tasks.task_eval import evaluate_recipe

    lines = ["| task | model | accuracy or EM (± 95% CI) | valid at once | valid after retry | needed retry | invalid |",
             "|---|---|---:|---:|---:|---:|---:|"]
    notes: list[str] = []
    for task in args.tasks.split(","):
        run = Path(getattr(args, f"{task}_run") or train(task, f"{args.runs}{task}", args.max_train, args.epochs,
                                                                  model + args.set))
        if args.reuse and (run / "qa_eval.json").is_file():
            res = json.loads((run / "qa_eval.json").read_text())
        else:
            res = evaluate_recipe(RECIPES[task], [f"data.max_eval={args.max_eval}", *model],
                                  str(run / "adapters" / task), args.retries)
            (run / "qa_eval.json").write_text(json.dumps(res, indent=2) + "\n")
        lines += rows(task, res, run)
        if task == "mcq":
            picked = {k: res[k]["picked"] for k in ("zero_shot_logprob", "adapter_logprob")}
            notes.append(f"MCQ letters picked by log-prob: zero-shot {picked['zero_shot_logprob']}, adapter "
                         f"{picked['adapter_logprob']}; correct answers {res['zero_shot_logprob']['answers']}.")
        print("\n".join(lines + notes), flush=True)
    note = ("SmolLM2-135M-Instruct on CPU, bf16 autocast; adapters trained with the recipes in recipes/qa/ on "
            "the training part of the seeded 5:1:1 split (records and steps in each row), scored on its test part "
            f"(n per row); greedy first answer, then up to {args.retries} retries (new seed each, temperature 0.7, "
            "top-p 0.9) while the validator rejects the output.")
    write_section(note + "\n\n" + "\n".join(lines) + "".join(f"\n\n{n}" for n in notes), HEADING, Path(args.results))


if __name__ == "__main__":
    main()
