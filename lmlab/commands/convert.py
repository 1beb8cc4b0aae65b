"""`lmlab convert SRC --to hf|lmlab|gguf --out PATH`: any loadable model (plus a LoRA adapter, merged
in) as an lmlab checkpoint, a Hugging Face folder or a GGUF file for llama.cpp / Ollama (see
lmlab/weights/loading.py and lmlab/weights/)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a model (GGUF, llama2.c, HF folder, lmlab checkpoint) to an lmlab or HF folder or a GGUF file",
        description="Load SRC with lmlab's loader and write it to --out: 'lmlab' = model.safetensors + "
        "config.json (+ tokenizer), 'hf' = a folder transformers.AutoModelForCausalLM.from_pretrained loads, "
        "'gguf' = one file llama.cpp and Ollama run (tokenizer and chat template in its metadata).",
    )
    p.add_argument("src", help="a registered name (smollm2-135m-instruct), file (.gguf, llama2.c .bin/.pt) or folder")
    p.add_argument("--to", required=True, choices=["lmlab", "hf", "gguf"], help="output format")
    p.add_argument("--out", required=True,
                   help="output folder (new, empty, or an earlier export of the same kind), or the .gguf file to write")
    p.add_argument("--force", action="store_true",
                   help="write into a folder holding other files, or replace a file that is not a GGUF "
                   "(lmlab still never replaces a file it did not write inside a folder)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="weight dtype to store for lmlab/hf (default fp32; bf16 halves the folder)")
    p.add_argument("--type", dest="gguf_type", default="f16", choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
                   help="GGUF tensor type of the matrices (norms stay f32; default f16)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder (lmlab or peft) to merge in first")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmlab.weights.loading import convert

    transform = None
    if args.adapter:
        from lmlab.adapters.files import load_adapter
        from lmlab.adapters.lora import merge_and_unload

        def transform(model):
            return merge_and_unload(load_adapter(model, args.adapter))
    out = convert(args.src, args.to, args.out, dtype=args.dtype, gguf_type=args.gguf_type, transform=transform,
                  force=args.force)
    print(f"wrote {args.to} {'file' if args.to == 'gguf' else 'folder'} {out}")
    return 0
