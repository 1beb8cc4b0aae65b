"""`lmlab pipeline RECIPE.yaml [stage.a.b=c ...] [--force]`: pretrain -> SFT -> DPO -> verifier in one command,
then a report card (lmlab/tasks/pipeline.py)."""

from __future__ import annotations

import argparse

from lmlab.commands._recipe import add_recipe_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pipeline", help="the alignment pipeline (pretrain -> SFT -> DPO -> verifier) and its report card",
        description="Run a pipeline file (recipes/pipeline/*.yaml): each stage in <out_dir>/<stage>, finished "
                    "stages skipped, a killed stage resumed; overrides address a stage (sft.train.max_steps=200, "
                    "stages=[pretrain,sft,verifier]). The report card (report.md) is kept unless --force.",
    )
    add_recipe_arguments(p, "recipes/pipeline/modern-decoder-cpu.yaml")
    p.add_argument("--force", action="store_true", help="rewrite an existing report card")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lmlab.errors import ConfigError
    from lmlab.schema.load import field_docs
    from lmlab.schema.pipeline import PipelineBase
    from lmlab.tasks.pipeline import STAGES, load_pipeline, run_pipeline

    if args.list_keys:
        docs = field_docs(PipelineBase)
        for name, stage in STAGES.items():
            docs.update(field_docs(stage.schema, f"{name}."))
        for key, doc in docs.items():
            print(f"{key:40s} {doc}")
        return 0
    if not args.recipe:
        raise ConfigError("lmlab pipeline: give a pipeline file (see recipes/pipeline/), or --list-keys")
    run_pipeline(load_pipeline(args.recipe, args.overrides), force_report=args.force)
    return 0
