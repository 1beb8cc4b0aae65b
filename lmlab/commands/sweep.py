"""`lmlab sweep`: one run per point of a sweep file or of `--grid` flags on a recipe (see lmlab/evaluation/sweep.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmlab.commands._args import at_least
from lmlab.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="run a grid of recipe variants, then tables and curves",
        description="Run every point of SWEEP.yaml (or of --grid flags on RECIPE.yaml), each in its own "
        "folder; finished runs (summary.json present) are skipped. Writes results.csv/.md and plots/.",
    )
    p.add_argument("file", help="a sweep file (has a `recipe:` key) or a plain recipe used with --grid")
    p.add_argument("overrides", nargs="*", help="a.b=c overrides for every run (a recipe key, or with a "
                   "sweep file, a sweep key such as jobs=2)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a recipe key and its values; several --grid flags make a product")
    p.add_argument("--seeds", default="", help="comma-separated seeds, e.g. 0,1,2 (mean +/- std per point)")
    p.add_argument("--devices", default="", help="comma-separated devices given round-robin, e.g. cpu,cuda:0")
    p.add_argument("--jobs", type=at_least(1), default=0, help="runs at the same time (processes); default 1")
    p.add_argument("--out", default="", help="sweep folder (default runs/sweeps/<file name>)")
    p.add_argument("--in-process", action="store_true",
                   help="run each point inside this process, one after another (no start-up cost; no devices/jobs)")
    p.add_argument("--dry-run", action="store_true", help="print the planned runs and exit")
    p.set_defaults(func=run)


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated integers") from None


def inprocess_runner(recipe: Path, spec) -> None:
    """One sweep point as a pretraining run inside this process: no start-up cost, for tiny sweeps."""
    from lmlab.evaluation.sweep import run_overrides
    from lmlab.schema.load import load_config
    from lmlab.schema.pretrain import PretrainConfig
    from lmlab.tasks.pretrain import run_pretrain

    run_pretrain(load_config(recipe, run_overrides(spec), schema=PretrainConfig))


def run(args: argparse.Namespace) -> int:
    from lmlab.evaluation import sweep

    if sweep.is_sweep_file(args.file):
        if args.grid:
            raise ConfigError(f"{args.file} is a sweep file: put the grid in its `grid:` key, not --grid")
        cfg, recipe = sweep.load_sweep(args.file, args.overrides)
    else:
        if not args.grid and not args.seeds:
            raise ConfigError(f"{args.file}: a plain recipe needs --grid KEY=V1,V2 or --seeds (or pass a sweep file)")
        cfg = sweep.sweep_from_recipe(args.file, args.grid, [], overrides=args.overrides)
        recipe = args.file
    if args.seeds:
        cfg.seeds = _ints(args.seeds, "--seeds")
    if args.devices:
        cfg.devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if args.jobs:
        cfg.jobs = args.jobs
    elif args.devices and not cfg.jobs > 1:
        cfg.jobs = len(set(cfg.devices))  # one process per distinct device
    if args.out:
        cfg.out_dir = args.out
    if args.dry_run:
        for spec in sweep.plan(cfg, recipe):
            state = "done" if spec.finished else "todo"
            print(f"{state}  {spec.run_dir}  {' '.join(spec.overrides)}" + (f"  [{spec.device}]" if spec.device else ""))
        return 0
    runner = sweep.subprocess_runner
    if args.in_process:
        if cfg.jobs > 1 or len(set(cfg.devices)) > 1:
            raise ConfigError("--in-process runs one point at a time on one device: drop --jobs/--devices")
        runner = inprocess_runner
    result = sweep.run_sweep(cfg, Path(recipe), runner)
    print(f"ran {len(result.ran)}, skipped {len(result.skipped)}, failed {len(result.failed)}")
    for path in result.tables:
        print(f"table: {path}")
    if result.failed:
        from lmlab.evaluation.sweep import RunFailed

        for name, err in result.failed.items():
            print(f"failed: {name}: {err}")
        raise RunFailed(f"{len(result.failed)} of {len(result.ran) + len(result.failed)} run(s) failed "
                        f"({', '.join(result.failed)}); see {result.sweep_dir / 'results.md'}")
    return 0
