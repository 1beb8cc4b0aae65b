"""`lmlab classify RECIPE.yaml [a.b=c ...] [--seeds 0,1,2]`: a classification run (lmlab/tasks/classify.py)."""

from __future__ import annotations

import argparse

from lmlab.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "classify", help="sentence classification: zero-shot, fine-tuning or LoRA from a recipe",
        description="Run a classification recipe (recipes/classify/*.yaml). Overrides use dotted keys: "
                    "classify.method=lora optim.lr=5e-4 data.max_train=200.",
    )
    p.add_argument("recipe", nargs="?", help="recipe YAML (e.g. recipes/classify/sst5-lora-smollm2.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--seeds", default="", help="comma-separated seeds: one run each, then mean +/- std")
    p.add_argument("--list-keys", action="store_true", help="print every config key with its doc and exit")
    p.set_defaults(func=_run)


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None


def _run(args: argparse.Namespace) -> int:
    if args.list_keys:
        from lmlab.schema.classify import ClassifyConfig
        from lmlab.schema.load import field_docs

        for key, doc in field_docs(ClassifyConfig).items():
            print(f"{key:32s} {doc}")
        return 0
    if not args.recipe:
        raise ConfigError("lmlab classify: give a recipe YAML (see recipes/classify/)")
    from lmlab.tasks.classify import run_recipe

    run_recipe(args.recipe, args.overrides, parse_seeds(args.seeds) or None)
    return 0
