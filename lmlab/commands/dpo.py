"""`lmlab dpo RECIPE.yaml [a.b=c ...]`: Direct Preference Optimization (lmlab/tasks/dpo.py)."""

from __future__ import annotations

import argparse

from lmlab.commands._recipe import add_recipe_arguments, load_recipe


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "dpo", help="DPO / IPO / hinge preference tuning (LoRA or full) from a recipe",
        description="Run a DPO recipe. Overrides use dotted keys: dpo.beta=0.2 dpo.loss=ipo data.max_train=200 "
                    "eval.reward_model=runs/reward-hh-smollm2.",
    )
    add_recipe_arguments(p, "recipes/dpo/hh-rlhf-smollm2.yaml")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lmlab.schema.dpo import DPOConfig
    from lmlab.tasks.dpo import run_dpo

    cfg = load_recipe(args, DPOConfig)
    if cfg is not None:
        run_dpo(cfg)
    return 0
