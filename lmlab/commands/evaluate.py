"""`lmlab evaluate`: validation loss/perplexity of every checkpoint of a run, or the long-context
(attention-sink) comparison of the runs in a folder (see lmlab/evaluation/evaluate.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmlab.commands._args import at_least


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="validation loss of every checkpoint of a run (CSV + plot), or --long-context",
        description="Score every checkpoint of RUN_DIR on the run's own validation split -> "
        "RUN_DIR/eval/checkpoints.csv and .png. With --long-context F, DIR may be a run or a sweep "
        "folder: each run is scored at F x its trained context (loss by position) and sampled that far.",
    )
    p.add_argument("folder", help="a run folder (or, with --long-context, a sweep folder)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast dtype")
    p.add_argument("--max-batches", type=at_least(0), default=0,
                   help="validation batches per checkpoint (0 = the run's)")
    p.add_argument("--long-context", type=at_least(0), default=0, metavar="F", help="score F x the trained context")
    p.add_argument("--windows", type=at_least(1), default=8, help="long windows to average (with --long-context)")
    p.add_argument("--prompt", default="The", help="generation prompt (with --long-context)")
    p.add_argument("--out", default="", help="output folder for --long-context (default FOLDER/eval)")
    p.add_argument("--samples", action="append", default=[], metavar="PROMPTS",
                   help="instead of losses: continue these prompts from every checkpoint, side by side "
                   "(RUN_DIR/eval/samples.md); a prompt, or a file of prompts one per line; repeatable")
    p.add_argument("--max-new-tokens", type=int, default=60, help="tokens per sample (with --samples)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (with --samples)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every checkpoint (--samples)")
    p.set_defaults(func=run)


def _prompts(items: list[str]) -> list[str]:
    """Each --samples value: a file's non-empty lines, or the prompt itself."""
    out: list[str] = []
    for item in items:
        path = Path(item)
        out += [ln for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else [item]
    return out


def run(args: argparse.Namespace) -> int:
    from lmlab.errors import DataError
    from lmlab.evaluation import evaluate

    folder = Path(args.folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such run folder")
    if args.samples:
        path = evaluate.checkpoint_samples(folder, _prompts(args.samples), max_new_tokens=args.max_new_tokens,
                                           temperature=args.temperature, seed=args.seed, device=args.device)
        print(path.read_text())
        print(f"wrote {path}")
        return 0
    if args.long_context:
        runs = [folder] if evaluate.checkpoint_dirs(folder) else sorted(
            d for d in folder.iterdir() if d.is_dir() and evaluate.checkpoint_dirs(d))
        if not runs:
            raise DataError(f"{folder}: no run with checkpoints (a run folder or a folder of runs)")
        paths = evaluate.long_context_eval(runs, args.out or folder / "eval", args.long_context, args.windows,
                                           args.prompt, device=args.device)
        print(next(p for p in paths if p.suffix == ".md").read_text())
    else:
        paths = evaluate.evaluate_run(folder, args.device, args.dtype, args.max_batches)
        print(paths[0].read_text())
    for path in paths:
        print(f"wrote {path}")
    return 0
