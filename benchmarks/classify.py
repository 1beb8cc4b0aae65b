"""Classification table: zero-shot, full fine-tuning and LoRA on SST-5 and CFIMDB dev with SmolLM2-135M,
mean +/- std over seeds, against the minllama reference means (stories42M backbone, 10 seeds).

Each recipe runs in its own process (`python -m lmlab classify RECIPE --seeds ...`), so its peak memory
is its own; a recipe whose summary.json exists is read, not re-run (delete the folder to redo it).

    python benchmarks/classify.py                                   # all six recipes, seeds 0,1,2
    python benchmarks/classify.py --only sst5-lora --seeds 0 --set data.max_train=500 train.epochs=1

On a shared, loaded CPU add `--set train.threads=1`: with other processes on the cores, two intra-op
threads spend most of their time at barriers (measured here: 750 vs 32 tokens/s forward).
Prints the table and writes it under "## Classification" in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "RESULTS.md"
HEADING = "## Classification"
RECIPES = ["sst5-zeroshot", "cfimdb-zeroshot", "sst5-finetune", "cfimdb-finetune", "sst5-lora", "cfimdb-lora"]
# minllama README reference: dev accuracy means over 10 seeds (stories42M)
SEED_DEV = {"sst5-zeroshot": 0.237, "cfimdb-zeroshot": 0.490, "sst5-finetune": 0.411, "cfimdb-finetune": 0.833,
            "sst5-lora": 0.275, "cfimdb-lora": 0.510}


# --subset: what fits this 2-core CPU in ~40 minutes for all twelve fine-tuning runs. One epoch over a random
# 3,000 of SST-5's 8,544 training sentences (94 steps of 32) and 800 of CFIMDB's 1,707 reviews cut to 128
# tokens (50 steps of 16); dev sets whole. Full fine-tuning gives the fresh head 10x the backbone's lr
# (at 3e-5 a fresh head barely moves in 94 steps); LoRA trains head and adapters at 5e-4.
SUBSET = {
    "sst5": ["data.max_train=3000", "train.epochs=1", "train.batch_size=16", "train.grad_accum=2"],
    "cfimdb": ["data.max_train=800", "data.max_len=128", "train.epochs=1", "train.batch_size=8", "train.grad_accum=2"],
    "finetune": ["optim.lr=3e-5", "classify.head_lr_mult=10"],
    "lora": [],
    "zeroshot": [],
}


def overrides(name: str, args: argparse.Namespace) -> list[str]:
    task, method = name.split("-")
    base = SUBSET[task] + SUBSET[method] if args.subset and method != "zeroshot" else []
    if args.subset and method == "zeroshot" and task == "cfimdb":
        base = ["data.max_len=128"]
    return base + list(args.set)


def run_recipe(name: str, args: argparse.Namespace) -> dict:
    """Run (or read) one recipe's seeds; returns its summary.json plus the measured wall time."""
    out = Path(args.out) / name
    summary_path = out / "summary.json"
    if not summary_path.exists():
        seeds = "0" if name.endswith("zeroshot") else args.seeds  # zero-shot is deterministic
        cmd = [sys.executable, "-m", "lmlab", "classify", str(ROOT / "recipes" / "classify" / f"{name}-smollm2.yaml"),
               f"out_dir={out}", "logging.progress=false", *overrides(name, args), "--seeds", seeds]
        if args.dev_only:
            cmd.insert(-2, "data.test=")
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(summary_path.read_text())


def table(rows: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [f"SmolLM2-135M-Instruct (embedded Q4_1 GGUF, dequantized to fp32, bf16 autocast) on CPU "
             f"({torch_threads()} threads); recipes `recipes/classify/*-smollm2.yaml`"
             + (f" with `{' '.join(args.set)}`" if args.set else "")
             + (" with the `--subset` settings (one epoch on a random 3,000 SST-5 / 800 CFIMDB training examples, "
                "CFIMDB cut to 128 tokens; see SUBSET in the script)" if args.subset else "")
             + f"; command: `python benchmarks/classify.py --seeds {args.seeds}"
             + (" --subset" if args.subset else "") + (" --dev-only" if args.dev_only else "") + "`.", "",
             "| task | method | seed ref. dev acc | lmlab dev acc | dev macro-F1 | test acc | seeds | wall s / seed | peak MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in rows.items():
        task, method = name.split("-")
        cell = lambda k: f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f}" if k in s else "-"  # noqa: E731
        lines.append(f"| {task} | {method} | {SEED_DEV[name]:.3f} | {cell('dev_accuracy')} | {cell('dev_macro_f1')} | "
                     f"{cell('test_accuracy')} | {s['n']} | {s['wall_time_s']['mean']:.0f} | {s['peak_mem_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def write_section(text_table: str) -> None:
    """Replace (or append) the "## Classification" section of RESULTS.md, leaving the rest alone."""
    from lmlab.fileio import atomic_write_text

    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    new = f"{HEADING}\n\n{text_table}\n"
    section = re.search(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", text, flags=re.S | re.M)
    text = text[: section.start()] + new + text[section.end():] if section else text.rstrip("\n") + "\n\n" + new
    atomic_write_text(RESULTS, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--only", default="", help="comma-separated recipe names (default: all six)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every recipe")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-classify"))
    ap.add_argument("--dev-only", action="store_true", help="skip test predictions (saves time)")
    ap.add_argument("--subset", action="store_true", help="the CPU-budget settings in SUBSET (see above)")
    ap.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = ap.parse_args()
    names = [n for n in RECIPES if not args.only or n in args.only.split(",")]
    rows = {name: run_recipe(name, args) for name in names}
    text = table(rows, args)
    print(text)
    if not args.no_write:
        write_section(text)


if __name__ == "__main__":
    main()
