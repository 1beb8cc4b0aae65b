"""`lmlab convert SRC --to hf|lmlab --out DIR`: any loadable model as an lmlab checkpoint or a Hugging
Face folder (see lmlab/weights/loading.py and lmlab/weights/)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a model (GGUF, llama2.c, HF folder, lmlab checkpoint) to an lmlab or HF folder",
        description="Load SRC with lmlab's loader and write it to --out: 'lmlab' = model.safetensors + "
        "config.json (+ tokenizer), 'hf' = a folder transformers.AutoModelForCausalLM.from_pretrained loads.",
    )
    p.add_argument("src", help="a registered name (smollm2-135m-instruct), file (.gguf, llama2.c .bin/.pt) or folder")
    p.add_argument("--to", required=True, choices=["lmlab", "hf"], help="output format")
    p.add_argument("--out", required=True, help="output folder: new, empty, or an earlier export of the same kind")
    p.add_argument("--force", action="store_true",
                   help="write into a folder holding other files (lmlab still never replaces a file it did not write)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="weight dtype to store (default fp32; bf16 halves the folder)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmlab.weights.loading import convert

    out = convert(args.src, args.to, args.out, dtype=args.dtype, force=args.force)
    print(f"wrote {args.to} folder {out}")
    return 0
