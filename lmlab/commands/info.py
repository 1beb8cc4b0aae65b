"""`lmlab info MODEL`: the config, parameter count, weight memory and tokenizer of any loadable model."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="show a model's config, parameter count, memory and tokenizer")
    p.add_argument("model", help="a registered name (smollm2-135m-instruct), preset:NAME, file or folder")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmlab.weights.loading import describe, load_model

    info = describe(load_model(args.model))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['source']}  ({info['kind']}, {info['dtype']})")
    print(f"parameters: {info['parameters']:,} ({info['non_embedding_parameters']:,} without embeddings)")
    print(f"weights: {info['memory_fp32_mb']:,.1f} MiB at fp32, {info['memory_bf16_mb']:,.1f} MiB at bf16")
    tok = info.get("tokenizer")
    if tok:
        print(f"tokenizer: {tok['kind']}, vocab {tok['vocab_size']:,}, bos {tok['bos_id']}, eos {tok['eos_id']}, "
              f"chat template {'yes' if tok['chat_template'] else 'no'}")
    else:
        print("tokenizer: none found")
    print("config:")
    width = max(len(k) for k in info["config"])
    for key, value in info["config"].items():
        print(f"  {key:<{width}}  {value}")
    return 0
