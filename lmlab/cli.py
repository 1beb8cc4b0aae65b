"""The `lmlab` command: a thin dispatcher over `lmlab.commands.*` (see that package's docstring)."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import lmlab.commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmlab", description="lmlab: a language-model lab.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(lmlab.commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"lmlab.commands.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        sys.exit(2)
    from lmlab.errors import LmlabError

    try:
        result = args.func(args)
    except LmlabError as err:  # user errors: one clear line, no traceback
        print(f"lmlab {args.command}: error: {err}", file=sys.stderr)
        sys.exit(1)
    if isinstance(result, int):
        sys.exit(result)
