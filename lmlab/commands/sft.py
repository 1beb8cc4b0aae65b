"""`lmlab sft RECIPE.yaml [a.b=c ...]`: LoRA instruction tuning (lmlab/tasks/sft.py).

The same command trains the QA, summarization and math adapters: they are recipes with another
data.source (recipes/qa/*.yaml, recipes/sft/*.yaml).
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sft", help="LoRA instruction tuning (Alpaca, QA adapters, summarization, math) from a recipe",
        description="Run an SFT recipe. Overrides use dotted keys: lora.rank=8 train.epochs=1 data.max_train=200.",
    )
    p.add_argument("recipe", nargs="?", help="recipe YAML (e.g. recipes/sft/alpaca-lora-smollm2.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--list-keys", action="store_true", help="print every config key with its doc and exit")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.list_keys:
        from lmlab.schema.load import field_docs
        from lmlab.schema.sft import SFTConfig

        for key, doc in field_docs(SFTConfig).items():
            print(f"{key:32s} {doc}")
        return 0
    from lmlab.tasks.sft import run_recipe

    run_recipe(args.recipe, args.overrides)
    return 0
