"""QA task adapters on SmolLM2-135M-Instruct (seed 004): MCQ (MMLU + ARC-Challenge) and SAQ (NQ-open).

For each task: train the adapter with the SFT path (`recipes/qa/*.yaml`, on a subset here), then on
the recipe's test split (capped) measure the zero-shot letter log-probability baseline (MCQ), the base
model's generated answers and the adapter's, each with validation and retries: accuracy or EM/F1, and
the share of outputs valid at once, valid after retry, and still invalid.

    python benchmarks/qa.py --max-train 96 --max-eval 60           # trains both adapters (CPU: ~1 h)
    python benchmarks/qa.py --mcq-run runs/qa-mcq --saq-run runs/qa-saq --max-eval 200
Writes the section "## QA adapters" of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from sft_alpaca import write_section  # noqa: E402

HEADING = "## QA adapters"
RECIPES = {"mcq": "recipes/qa/mcq-smollm2.yaml", "saq": "recipes/qa/saq-smollm2.yaml"}


def train(task: str, out: str, max_train: int, epochs: float, model: list[str]) -> Path:
    from lmlab.tasks.sft import run_recipe

    run_recipe(RECIPES[task], [f"out_dir={out}", f"data.max_train={max_train}", f"train.epochs={epochs}",
                               "logging.progress=false", *model])
    return Path(out)


def rows(task: str, res: dict, run: Path) -> list[str]:
    s = json.loads((run / "summary.json").read_text())["train"]
    trained = f"{s['steps']} steps, {s['train_time_s']:.0f} s"
    metric = "accuracy" if task == "mcq" else "exact_match"
    out = []
    if task == "mcq":
        z = res["zero_shot_logprob"]
        out.append(f"| mcq | zero-shot letter log-prob (no adapter) | {z['accuracy']:.3f} "
                   f"(MMLU {z.get('accuracy_mmlu', float('nan')):.3f}, ARC {z.get('accuracy_arc', float('nan')):.3f}) "
                   f"| - | - | - | - |")
    for name, label in (("base_0shot", "base model, generated"), ("adapter", f"LoRA adapter ({trained})")):
        r = res[name]
        score = f"{r[metric]:.3f}" + (f" / F1 {r['f1']:.3f}" if task == "saq" else "")
        out.append(f"| {task} | {label} | {score} | {r['valid_first_try']:.3f} | {r['valid_after_retry']:.3f} "
                   f"| {r['needed_retry']:.3f} | {r['invalid']:.3f} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="mcq,saq")
    ap.add_argument("--mcq-run", default="")
    ap.add_argument("--saq-run", default="")
    ap.add_argument("--max-train", type=int, default=96)
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--max-eval", type=int, default=60)
    ap.add_argument("--retries", type=int, default=2)
    ap.add_argument("--model", default="", help="base model spec (default: the recipes' SmolLM2)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training recipe override")
    ap.add_argument("--results", default=str(Path(__file__).parent / "RESULTS.md"), help="results file to update")
    args = ap.parse_args()
    model = [f"model.spec={args.model}"] if args.model else []
    from lmlab.tasks.task_eval import evaluate_recipe

    lines = ["| task | model | accuracy or EM | valid at once | valid after retry | needed retry | invalid |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for task in args.tasks.split(","):
        run = Path(getattr(args, f"{task}_run") or train(task, f"runs/bench-qa-{task}", args.max_train, args.epochs,
                                                                  model + args.set))
        res = evaluate_recipe(RECIPES[task], [f"data.max_eval={args.max_eval}", *model], str(run / "adapters" / task),
                              args.retries)
        (run / "qa_eval.json").write_text(json.dumps(res, indent=2) + "\n")
        lines += rows(task, res, run)
        print("\n".join(lines), flush=True)
    note = (f"SmolLM2-135M-Instruct on CPU; adapters trained with the recipes in recipes/qa/ on the first "
            f"{args.max_train} training records of the seeded 5:1:1 split (epochs {args.epochs}); scored on the "
            f"first {args.max_eval} test records; greedy first answer, then up to {args.retries} retries "
            "(new seed, temperature 0.7 x attempt, top-p 0.9) while the validator rejects the output.")
    write_section(note + "\n\n" + "\n".join(lines), HEADING, Path(args.results))


if __name__ == "__main__":
    main()
