"""Alpaca LoRA instruction tuning of SmolLM2-135M-Instruct (seed 000): plain and conditional perplexity on
the test split before and after, training time, peak memory, and samples for the novel instructions.

The whole recipe (1,429 training records x 3 epochs, 270 steps) takes about 25 min on 2 CPU cores; the
flags cap it for a quicker look, and every number says what ran. Runs `lmlab sft` in-process, or formats
a finished run:

    python benchmarks/sft_alpaca.py                                               # the whole recipe (README)
    python benchmarks/sft_alpaca.py --max-train 64 --max-eval 48 --epochs 1       # a few minutes
    python benchmarks/sft_alpaca.py --run runs/sft-alpaca                         # table of a finished run
Writes the section "## Alpaca instruction tuning" of benchmarks/RESULTS.md (other sections untouched).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

RESULTS = Path(__file__).parent / "RESULTS.md"
HEADING = "## Alpaca instruction tuning"
RECIPE = "recipes/sft/alpaca-lora-smollm2.yaml"


def write_section(body: str, heading: str, results: Path = RESULTS) -> None:
    """Replace (or append) one `## heading` section of RESULTS.md."""
    from lmlab.fileio import atomic_write_text

    text = results.read_text() if results.exists() else "# Benchmark results\n\n"
    new = f"{heading}\n\n{body.strip()}\n\n"
    pattern = rf"^{re.escape(heading)}\n.*?(?=^## |\Z)"
    text = re.sub(pattern, lambda _: new, text, flags=re.S | re.M) if re.search(pattern, text, flags=re.S | re.M) \
        else text.rstrip() + "\n\n" + new
    atomic_write_text(results, text)


def table(summary: dict, settings: str) -> str:
    b, a, t, d = summary["before"], summary["after"], summary["train"], summary["data"]
    rows = [
        "| | before LoRA | after LoRA |", "|---|---:|---:|",
        f"| conditional perplexity (response given instruction) | {b['conditional_ppl']:.3f} | {a['conditional_ppl']:.3f} |",
        f"| plain perplexity (prompt + response) | {b['plain_ppl']:.3f} | {a['plain_ppl']:.3f} |",
    ]
    facts = (f"Test examples {d['test']['examples']} ({b['conditional_tokens']} response tokens), training examples "
             f"{d['train']['examples']}, {t['steps']} optimizer steps, {t['tokens_seen']} tokens; training time "
             f"{t['train_time_s']:.0f} s, peak memory (RSS) {t['peak_mem_mb']:.0f} MB; final train loss "
             f"{t['train_loss']:.3f}, validation loss {t['val_loss']:.3f}. Skipped: "
             f"{ {k: v['skipped'] for k, v in d.items()} }, truncated: { {k: v['truncated'] for k, v in d.items()} }.")
    samples = "\n".join(f"- *{q}* -> {a[:300]!r}" for q, a in summary.get("samples", {}).items())
    return "\n".join([settings, "", *rows, "", facts, "", "Samples (temperature 0.7, top-p 0.9):", "", samples])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="format this finished run folder instead of training")
    ap.add_argument("--out", default="runs/bench-sft-alpaca")
    ap.add_argument("--max-train", type=int, default=0, help="0 = the whole training split")
    ap.add_argument("--max-eval", type=int, default=0, help="0 = the whole validation and test splits")
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("overrides", nargs="*", help="more recipe overrides")
    ap.add_argument("--results", default=str(Path(__file__).parent / "RESULTS.md"), help="results file to update")
    args = ap.parse_args()
    if args.run:
        out = Path(args.run)
        summary = json.loads((out / "summary.json").read_text())
    else:
        from lmlab.tasks.sft import run_recipe

        out = Path(args.out)
        summary = run_recipe(RECIPE, [f"out_dir={out}", f"data.max_train={args.max_train}",
                                      f"data.max_eval={args.max_eval}", f"train.epochs={args.epochs}",
                                      f"train.grad_accum={args.grad_accum}", "logging.progress=false",
                                      *args.overrides])
    import yaml

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    d, tr = cfg["data"], cfg["train"]
    settings = (f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32, bf16 autocast, CPU), `{RECIPE}` with "
                f"max_train={d['max_train']}, max_eval={d['max_eval']} (0 = all), epochs={tr['epochs']}, "
                f"micro-batch {tr['batch_size']} x accumulation {tr['grad_accum']}, LoRA r {cfg['lora']['rank']} "
                f"alpha {cfg['lora']['alpha']} on {cfg['lora']['target_modules']}, lr {cfg['optim']['lr']}.")
    text = table(summary, settings)
    print(text)
    write_section(text, HEADING, Path(args.results))


if __name__ == "__main__":
    main()
