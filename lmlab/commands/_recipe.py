"""What every recipe command shares: the RECIPE and KEY=VALUE arguments, `--list-keys`, and loading the
recipe into its schema. (A leading underscore: cli.py does not register this module as a command.)"""

from __future__ import annotations

import argparse
from typing import Any


def add_recipe_arguments(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("recipe", nargs="?", help=f"recipe YAML (e.g. {example})")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (dotted keys, YAML values)")
    p.add_argument("--list-keys", action="store_true", help="print every config key with its doc and exit")


def load_recipe(args: argparse.Namespace, schema: type) -> Any:
    """The recipe's config, or None after printing the keys for --list-keys."""
    from lmlab.errors import ConfigError
    from lmlab.schema.load import field_docs, load_config

    if args.list_keys:
        for key, doc in field_docs(schema).items():
            print(f"{key:32s} {doc}")
        return None
    if not args.recipe:
        raise ConfigError(f"lmlab {args.command}: give a recipe YAML (see recipes/), or --list-keys")
    return load_config(args.recipe, args.overrides, schema=schema)
