"""The `lmlab` command: a thin dispatcher over `lmlab.commands.*` (see that package's docstring)."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

import lmlab.commands


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line like every other lmlab error (argparse prints the whole
    usage first); subcommand parsers are of this class too."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lmlab", description="lmlab: a language-model lab.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(lmlab.commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):  # shared helpers, not commands
            continue
        module = importlib.import_module(f"lmlab.commands.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may come after flags (`--seeds 0,1 train.epochs=1`): argparse stops collecting
    # positionals at the first flag, so the rest arrive here
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.parse_args(argv)  # the usual "unrecognized arguments" error and exit status 2
    if not getattr(args, "func", None):
        parser.print_help()
        sys.exit(2)
    from lmlab.errors import LmlabError

    try:
        result = args.func(args)
    except LmlabError as err:  # user errors: one clear line, no traceback
        print(f"lmlab {args.command}: error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C: the user knows why; runs resume from their last checkpoint
        print(f"\nlmlab {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `lmlab info MODEL | head`: the reader left; nothing to report
        sys.stdout = open(os.devnull, "w")
        sys.exit(1)
    if isinstance(result, int):
        sys.exit(result)
