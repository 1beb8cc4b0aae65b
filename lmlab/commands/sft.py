"""`lmlab sft RECIPE.yaml [a.b=c ...]`: LoRA instruction tuning (lmlab/tasks/sft.py).

The same command trains the QA, summarization and math adapters: they are recipes with another
data.source (recipes/qa/*.yaml, recipes/sft/*.yaml).
"""

from __future__ import annotations

import argparse

from lmlab.commands._recipe import add_recipe_arguments, load_recipe


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sft", help="LoRA instruction tuning (Alpaca, QA adapters, summarization, math) from a recipe",
        description="Run an SFT recipe. Overrides use dotted keys: lora.rank=8 train.epochs=1 data.max_train=200.",
    )
    add_recipe_arguments(p, "recipes/sft/alpaca-lora-smollm2.yaml")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lmlab.schema.sft import SFTConfig
    from lmlab.tasks.sft import run_sft

    cfg = load_recipe(args, SFTConfig)
    if cfg is not None:
        run_sft(cfg)
    return 0
