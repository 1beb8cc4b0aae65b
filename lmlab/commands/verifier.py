"""`lmlab verifier sample|train|eval|all RECIPE.yaml [a.b=c ...]`: the GSM8K verifier (lmlab/tasks/verifier.py)."""

from __future__ import annotations

import argparse

from lmlab.commands._recipe import add_recipe_arguments, load_recipe

ACTIONS = ("sample", "train", "eval", "all")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "verifier", help="GSM8K verifier: sample + label solutions, train a scalar head, best-of-N eval",
        description="sample: K labelled solutions per training problem (samples/train.jsonl); train: the verifier "
                    "on them; eval: greedy, majority vote, verifier best-of-N, weighted vote and oracle pass@N on "
                    "test problems; all: the three in turn (each skipped when done). All act on the recipe's "
                    "out_dir, e.g. lmlab verifier all recipes/verifier/gsm8k-smollm2.yaml generator.samples=8.",
    )
    p.add_argument("action", choices=ACTIONS, help="which step")
    add_recipe_arguments(p, "recipes/verifier/gsm8k-smollm2.yaml")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lmlab.schema.verifier import VerifierConfig
    from lmlab.tasks import verifier

    cfg = load_recipe(args, VerifierConfig)
    if cfg is not None:
        {"sample": verifier.run_sample, "train": verifier.run_train, "eval": verifier.run_eval,
         "all": verifier.run_verifier}[args.action](cfg)
    return 0
