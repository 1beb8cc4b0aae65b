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
    p.add_argument("--dry-run", action="store_true",
                   help="print the parameters, the memory estimate and whether it fits, and exit without training")
    p.add_argument("--device-memory", type=float, default=0.0, metavar="GB",
                   help="with --dry-run: the device memory to check against (default: the recipe's device's)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lmlab.schema.pretrain import PretrainConfig
    from lmlab.tasks.pretrain import dry_run, run_pretrain

    cfg = load_recipe(args, PretrainConfig)
    if cfg is not None and args.dry_run:
        print(dry_run(cfg, args.device_memory))
    elif cfg is not None:
        run_pretrain(cfg)
    return 0
