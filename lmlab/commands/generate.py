"""`lmlab generate [MODEL] --prompt TEXT ...`: sample from any loadable model, streaming to the terminal."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a model (KV cache, batches, sampling)")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"name, checkpoint folder, GGUF/llama2.c file or HF dir (default {DEFAULT_MODEL})")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--batch-file", type=Path, help="prompts, one per line (or JSONL with a 'prompt' field)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--min-p", type=float)
    p.add_argument("--epsilon", type=float, help="epsilon sampling: drop tokens with probability < E")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, help="sampling seed (same seed, same text)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap prompts in the model's chat template (default: when the tokenizer has one)")
    p.add_argument("--system", help="system message for --chat")
    p.add_argument("--tokenizer", help="tokenizer file/folder when the model has none beside it")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--quantize", default="auto", choices=["auto", "none", "int8", "int4"],
                   help="auto: keep a GGUF file's 4/8-bit weights quantized (packed int4 / int8 kernels) and fuse "
                        "projections; none: float weights; int8 / int4: quantize any model (lmlab/model/quantize.py)")
    p.add_argument("--out", type=Path, help="write results as JSONL here (atomically)")
    p.add_argument("--no-stream", action="store_true", help="print results at the end only")
    p.set_defaults(func=run)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    from lmlab.errors import DataError

    prompts = list(args.prompt or [])
    if args.batch_file:
        try:
            lines = args.batch_file.read_text().splitlines()
        except OSError as err:
            raise DataError(f"{args.batch_file}: cannot read prompts ({err.strerror})") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    prompts.append(json.loads(line)["prompt"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(f"{args.batch_file}:{n}: expected a JSON object with a 'prompt' field") from None
            else:
                prompts.append(line)
    return prompts or [""]


def run(args: argparse.Namespace) -> None:
    from lmlab.generation.generate import GenerationConfig, generate
    from lmlab.generation.sampling import SamplingConfig
    from lmlab.precision import inference_dtype
    from lmlab.weights.loading import load_model

    prompts = _read_prompts(args)
    t0 = time.perf_counter()
    dtype = inference_dtype(args.dtype, args.device)
    loaded = load_model(args.model, device=args.device, dtype=dtype, tokenizer=args.tokenizer, quantize=args.quantize)
    load_s = time.perf_counter() - t0
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p if args.temperature else None,
                              args.min_p, args.epsilon, args.repetition_penalty)
    cfg = GenerationConfig(args.max_new_tokens, sampling, stop_strings=tuple(args.stop), seed=args.seed)
    tok = loaded.tokenizer
    chat = args.chat if args.chat is not None else bool(tok.chat_template)
    streaming = len(prompts) == 1 and not args.no_stream
    stream = (lambda _row, text: print(text, end="", flush=True)) if streaming else None
    t1 = time.perf_counter()
    outputs = generate(loaded.model, tok, prompts, cfg, chat=chat, system=args.system, stream=stream)
    gen_s = time.perf_counter() - t1
    if streaming:
        print()
    else:
        for prompt, text in zip(prompts, outputs):
            print(f"### {prompt}\n{text}\n")
    n_tokens = sum(len(tok.encode(o)) for o in outputs)
    print(f"[{loaded.source}: loaded in {load_s:.1f}s, {n_tokens} tokens in {gen_s:.1f}s]", file=sys.stderr)
    if args.out:
        from lmlab.fileio import atomic_write_text

        rows = [json.dumps({"prompt": p, "output": o}) for p, o in zip(prompts, outputs)]
        atomic_write_text(args.out, "\n".join(rows) + "\n")
