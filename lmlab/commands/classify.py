"""`lmlab classify RECIPE.yaml [a.b=c ...] [--seeds 0,1,2]`: a classification run (lmlab/tasks/classify.py)."""

from __future__ import annotations

import argparse

from lmlab.commands._recipe import add_recipe_arguments, load_recipe
from lmlab.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "classify", help="sentence classification: zero-shot, fine-tuning or LoRA from a recipe",
        description="Run a classification recipe (recipes/classify/*.yaml). Overrides use dotted keys: "
                    "classify.method=lora optim.lr=5e-4 data.max_train=200.",
    )
    add_recipe_arguments(p, "recipes/classify/sst5-lora-smollm2.yaml")
    p.add_argument("--seeds", default="", help="comma-separated seeds (>= 0): one run each, then mean +/- std")
    p.set_defaults(func=_run)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if any(s < 0 for s in seeds):
        raise ConfigError(f"--seeds {text!r}: seeds are >= 0")
    if len(set(seeds)) != len(seeds):  # the same run twice would count twice in the mean and std
        raise ConfigError(f"--seeds {text!r}: each seed once")
    return seeds


def _run(args: argparse.Namespace) -> int:
    from lmlab.schema.classify import ClassifyConfig
    from lmlab.tasks.classify import run_classify

    cfg = load_recipe(args, ClassifyConfig)
    if cfg is not None:
        run_classify(cfg, parse_seeds(args.seeds) or None)
    return 0
