"""Prompting baselines vs LoRA-tuned adapters (seed 001, phase 2): SST-2 accuracy, DialogSum ROUGE-1/2/L,
GSM8K final-answer exact match, for SmolLM2-135M-Instruct. Zero-shot and k-shot (chat turns drawn from
the training split) use the base model; the tuned row uses an adapter trained with `lmlab sft` on the
recipe in recipes/sft/ (pass its run folder, or --train to train one on a subset here).

    python benchmarks/prompting.py --max-eval 40 --shots 2
    python benchmarks/prompting.py --adapter summarize=runs/sft-dialogsum --adapter math=runs/sft-gsm8k
    python benchmarks/prompting.py --train --max-train 800 --max-eval 100     # the README table (~35 min)
Writes the section "## Prompting baselines and tuned adapters" of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from sft_alpaca import write_section  # noqa: E402

HEADING = "## Prompting baselines and tuned adapters"
RECIPES = {"sst2": "recipes/sft/sst2-lora-smollm2.yaml", "summarize": "recipes/sft/dialogsum-lora-smollm2.yaml",
           "math": "recipes/sft/gsm8k-lora-smollm2.yaml"}
METRICS = {"sst2": ["accuracy"], "summarize": ["rouge1", "rouge2", "rougeL"], "math": ["exact_match"]}


def fmt(r: dict | None, task: str) -> str:
    return "-" if r is None else " / ".join(f"{r[m]:.3f}" if task != "summarize" else f"{r[m]:.1f}" for m in METRICS[task])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="sst2,summarize,math")
    ap.add_argument("--max-eval", type=int, default=40)
    ap.add_argument("--shots", type=int, default=2)
    ap.add_argument("--adapter", action="append", default=[], metavar="TASK=RUN_DIR")
    ap.add_argument("--train", action="store_true", help="train the missing adapters on a subset first")
    ap.add_argument("--max-train", type=int, default=64)
    ap.add_argument("--model", default="", help="base model spec (default: the recipes' SmolLM2)")
    ap.add_argument("--results", default=str(Path(__file__).parent / "RESULTS.md"), help="results file to update")
    args = ap.parse_args()
    model = [f"model.spec={args.model}"] if args.model else []
    from lmlab.tasks.sft import run_recipe
    from lmlab.tasks.task_eval import evaluate_recipe

    runs = dict(item.split("=", 1) for item in args.adapter)
    lines = [f"| task | metric | zero-shot | {args.shots}-shot | LoRA-tuned |", "|---|---|---:|---:|---:|"]
    for task in args.tasks.split(","):
        if task not in runs and args.train:
            runs[task] = f"runs/bench-{task}"
            run_recipe(RECIPES[task], [f"out_dir={runs[task]}", f"data.max_train={args.max_train}",
                                       "data.max_eval=0", "eval.perplexity=false", "logging.progress=false", *model])
        adapter = str(Path(runs[task]) / "adapters" / task) if task in runs else ""
        over = [f"data.max_eval={args.max_eval}", *model]
        zero = evaluate_recipe(RECIPES[task], over, adapter)
        few = evaluate_recipe(RECIPES[task], over, "", shots=args.shots)
        print(json.dumps({"zero": zero, "few": few}, indent=2)[:3000], flush=True)
        lines.append(f"| {task} | {' / '.join(METRICS[task])} | {fmt(zero['base_0shot'], task)} | "
                     f"{fmt(few[f'base_{args.shots}shot'], task)} | {fmt(zero.get('adapter'), task)} |")
        print("\n".join(lines), flush=True)
    note = (f"SmolLM2-135M-Instruct on CPU, bf16 autocast, greedy decoding, up to {args.max_eval} test records of "
            "each recipe, a seeded sample (SST-2: SST-5 dev without neutral; DialogSum: the 5:1:1 split of dev, 71 "
            f"records; GSM8K: official test). Tuned adapters: {runs or 'none given'}.")
    write_section(note + "\n\n" + "\n".join(lines), HEADING, Path(args.results))


if __name__ == "__main__":
    main()
