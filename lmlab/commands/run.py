"""`lmlab run RECIPE.yaml [a.b=c ...]`: a pretraining recipe (see lmlab/tasks/pretrain.py)."""

from __future__ import annotations

import argparse

from lmlab.commands._recipe import add_recipe_arguments, load_recipe


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run", help="pretrain from a recipe YAML",
        description="Run a pretraining recipe. Overrides use dotted keys: train.max_steps=100 optim.lr=3e-4 "
                    "model.n_layers=2. Under `torchrun --nproc_per_node N -m lmlab run ...` it trains with DDP.",
    )
    add_recipe_arguments(p, "recipes/pretrain/shakespeare-char.yaml")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lmlab.schema.pretrain import PretrainConfig
    from lmlab.tasks.pretrain import run_pretrain

    cfg = load_recipe(args, PretrainConfig)
    if cfg is not None:
        run_pretrain(cfg)
    return 0
