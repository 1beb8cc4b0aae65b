"""`lmlab perplexity`: sliding-window perplexity of any loadable model on a text file (see lmlab/evaluation/evaluate.py)."""

from __future__ import annotations

import argparse
import json

from lmlab.commands._args import at_least


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "perplexity",
        help="sliding-window perplexity of a model on a text/JSONL/CSV file",
        description="Hugging Face 'perplexity of fixed-length models' method: windows of --context tokens "
        "every --stride tokens, each scoring only tokens not scored before.",
    )
    p.add_argument("model", help="a model name (e.g. smollm2-135m-instruct), checkpoint folder, GGUF, llama2.c .bin or HF folder")
    p.add_argument("--data", required=True, help="text file; .jsonl/.json use --field, .csv uses column 'text'")
    p.add_argument("--field", default="text", help="JSONL/JSON field holding the text")
    p.add_argument("--context", type=at_least(0), default=0,
                   help="window length (default: the model's context, at most 1024)")
    p.add_argument("--stride", type=at_least(0), default=0, help="tokens between window starts (default context/2)")
    p.add_argument("--max-tokens", type=at_least(0), default=0, help="score only the first N tokens (0 = all)")
    p.add_argument("--separator", default="auto", metavar="SEP",
                   help="documents of a text file, each scored on its own with BOS where the tokenizer adds one: "
                   "auto (split at <|endoftext|> when present), none (one stream), line, blank_line, or a "
                   "literal marker; JSONL/CSV records are documents")
    p.add_argument("--batch-size", type=at_least(1), default=1, help="windows per forward pass")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast dtype")
    p.add_argument("--quantize", default="none", choices=["none", "auto", "int8", "int4"],
                   help="score the model as `lmlab generate --quantize` runs it (auto: a GGUF's 4/8-bit weights "
                        "kept quantized, bf16 weights elsewhere)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmlab.evaluation.evaluate import model_perplexity

    result, info = model_perplexity(
        args.model, args.data, context=args.context, stride=args.stride, max_tokens=args.max_tokens,
        batch_size=args.batch_size, field=args.field, device=args.device, dtype=args.dtype, progress=not args.json,
        separator=args.separator,
        quantize=args.quantize,
    )
    if args.json:
        print(json.dumps({**info, "nll": result.nll, "ppl": result.ppl, "n_tokens": result.n_tokens,
                          "n_windows": result.n_windows, "n_docs": result.n_docs, "context": result.context,
                          "stride": result.stride, "seconds": result.seconds}))
    else:
        print(f"{info['model']} on {info['data']}: perplexity {result.ppl:.3f} (nll {result.nll:.4f}) over "
              f"{result.n_tokens:,} tokens of {result.n_docs:,} document(s), {result.n_windows} windows, "
              f"context {result.context}, stride {result.stride}, {info['dtype']} on {info['device']}, "
              f"{result.seconds:.1f} s "
              f"({result.tokens_per_s:,.0f} tokens/s)")
    return 0
