"""`lmlab reward RECIPE.yaml [a.b=c ...]` trains a reward model; `lmlab reward score RUN_DIR --data FILE`
scores JSONL pairs (accuracy) or prompt-completion lines with a trained one (lmlab/tasks/reward.py)."""

from __future__ import annotations

import argparse
import json

from lmlab.commands._args import at_least
from lmlab.commands._recipe import add_recipe_arguments, load_recipe


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "reward", help="train a Bradley-Terry reward model from a recipe, or `reward score RUN_DIR --data FILE`",
        description="Train: lmlab reward RECIPE.yaml [a.b=c ...]. Score: lmlab reward score RUN_DIR --data FILE "
                    "[--out SCORES.jsonl]; FILE holds pairs (prompt/chosen/rejected or HH-RLHF dialogues) or "
                    "prompt/completion lines.",
    )
    add_recipe_arguments(p, "recipes/reward/hh-rlhf-smollm2.yaml")
    p.add_argument("--data", help="score: the JSONL file to score")
    p.add_argument("--out", help="score: write one JSON line of rewards per input here")
    p.add_argument("--batch-size", type=at_least(1), default=8, help="score: sequences per forward pass")
    p.add_argument("--device", default="cpu", help="score: cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"], help="score: autocast dtype")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lmlab.errors import ConfigError

    if args.recipe == "score":
        from lmlab.tasks.reward import score_file

        if len(args.overrides) != 1 or not args.data:
            raise ConfigError("usage: lmlab reward score RUN_DIR --data FILE [--out SCORES.jsonl]")
        if args.out:
            from lmlab.fileio import check_output_file

            check_output_file(args.out)  # before the model loads and the scoring runs
        summary = score_file(args.overrides[0], args.data, args.out, args.batch_size, args.device, args.dtype)
        print(json.dumps(summary, indent=2))
        return 0
    from lmlab.schema.reward import RewardConfig
    from lmlab.tasks.reward import run_reward

    cfg = load_recipe(args, RewardConfig)
    if cfg is not None:
        run_reward(cfg)
    return 0
