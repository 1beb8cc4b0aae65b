"""`lmlab qa ask|eval`: answer questions with task adapters (routing, validation, retry), or score a
QA adapter on its recipe's test split against the zero-shot baseline (lmlab/tasks/qa.py).

Adapters are trained with `lmlab sft recipes/qa/mcq-smollm2.yaml` (and saq-smollm2.yaml).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmlab.commands._args import at_least
from lmlab.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("qa", help="QA with task adapters: ask (router + retry) or eval (test split)")
    sub = p.add_subparsers(dest="qa_command", required=True)
    ask = sub.add_parser("ask", help="answer questions; the router picks each one's adapter")
    ask.add_argument("questions", nargs="+", help="question text; MCQ options as lines 'A. ...'")
    ask.add_argument("--base", default="smollm2-135m-instruct", help="base model spec (loaded once)")
    ask.add_argument("--adapter", action="append", default=[], metavar="TASK=DIR",
                     help="task adapter folder (lmlab or peft), e.g. mcq=runs/qa-mcq/adapters/mcq")
    ask.add_argument("--task", choices=["mcq", "saq"], help="declare the task instead of the routing rule")
    ask.add_argument("--retries", type=at_least(0), default=2, help="extra attempts for invalid outputs")
    ask.set_defaults(func=_ask)
    ev = sub.add_parser("eval", help="score an adapter on its recipe's test split (+ zero-shot baseline)")
    ev.add_argument("recipe", help="the SFT recipe the adapter was trained with (its split and template)")
    ev.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides (e.g. data.max_eval=100)")
    ev.add_argument("--adapter", default="", help="adapter folder; empty = base model only")
    ev.add_argument("--retries", type=at_least(0), default=2, help="extra attempts for invalid outputs")
    ev.add_argument("--shots", type=at_least(0), default=0, metavar="K",
                    help="K solved training examples as earlier chat turns before each test question (few-shot)")
    ev.add_argument("--out", default="",
                    help="also write the full results, with each question's 0/1, to this JSON file")
    ev.set_defaults(func=_eval)


def _pairs(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        task, sep, folder = item.partition("=")
        if not sep:
            raise ConfigError(f"--adapter {item!r}: expected TASK=DIR (e.g. mcq=runs/qa-mcq/adapters/mcq)")
        out[task] = folder
    return out


def _ask(args: argparse.Namespace) -> int:
    from lmlab.tasks.qa import load_router

    router = load_router(args.base, _pairs(args.adapter), max_retries=args.retries)
    records = [{"instruction": q, "input": "", "output": "", **({"task": args.task} if args.task else {})}
               for q in args.questions]
    for q, (task, ans) in zip(args.questions, router.answer(records)):
        status = "valid" if ans.valid else "INVALID"
        print(f"[{task}, {status}, {ans.attempts} attempt(s)] {q.splitlines()[0][:60]!r} -> {ans.text}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from lmlab.fileio import atomic_write_text
    from lmlab.tasks.task_eval import evaluate_recipe

    if args.shots < 0:
        raise ConfigError(f"--shots {args.shots}: expected 0 or more examples")
    res = evaluate_recipe(args.recipe, args.overrides, args.adapter, args.retries, shots=args.shots)
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(res, indent=2) + "\n")
    brief = {k: {f: v for f, v in r.items() if f != "correct"} if isinstance(r, dict) else r for k, r in res.items()}
    print(json.dumps(brief, indent=2))  # the per-question lists only go to --out
    return 0
