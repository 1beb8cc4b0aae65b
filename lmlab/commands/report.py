"""`lmlab report`: a Markdown report of a run or sweep folder, plots embedded (see lmlab/evaluation/report.py)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="write a Markdown report of a run or sweep folder",
        description="Write DIR/report.md (config, summary table, curves). An existing report is kept "
        "unless --force is given.",
    )
    p.add_argument("folder", help="a run folder or a sweep folder")
    p.add_argument("--out", default="", help="report file (default FOLDER/report.md)")
    p.add_argument("--force", action="store_true", help="overwrite an existing report")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmlab.evaluation.report import write_report

    path = write_report(args.folder, args.out or None, force=args.force)
    print(f"report: {path}")
    return 0
