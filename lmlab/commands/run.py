"""`lmlab run RECIPE.yaml [a.b=c ...]`: run a training recipe (see lmlab/tasks/pretrain.py)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run", help="train from a recipe YAML",
        description="Run a recipe. Overrides use dotted keys: train.max_steps=100 optim.lr=3e-4 model.n_layers=2. "
                    "Under `torchrun --nproc_per_node N -m lmlab run ...` it trains with DDP.",
    )
    p.add_argument("recipe", nargs="?", help="recipe YAML (e.g. recipes/pretrain/shakespeare-char.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--list-keys", action="store_true", help="print every config key with its doc and exit")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.list_keys:
        from lmlab.schema.load import field_docs

        for key, doc in field_docs().items():
            print(f"{key:32s} {doc}")
        return 0
    if not args.recipe:
        raise SystemExit("lmlab run: a recipe YAML is required (or --list-keys)")
    from lmlab.tasks.pretrain import run_recipe

    run_recipe(args.recipe, args.overrides)
    return 0
