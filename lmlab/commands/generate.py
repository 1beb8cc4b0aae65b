"""`lmlab generate [MODEL] --prompt TEXT ...`: sample from any loadable model, streaming to the terminal.

`lmlab generate --chat` without a prompt is a multi-turn terminal chat, as `ollama run` is: the history is
kept (oldest turns dropped when it outgrows the context), `/reset` clears it, `/bye` or Ctrl-D quits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lmlab.commands._args import at_least, field_value

SAMPLING = "lmlab.schema.sections:SamplingConfig."

DEFAULT_MODEL = "smollm2-135m-instruct"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a model (KV cache, batches, sampling)")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"name, checkpoint folder, GGUF/llama2.c file or HF dir (default {DEFAULT_MODEL})")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--batch-file", type=Path, help="prompts, one per line (or JSONL with a 'prompt' field)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=128)
    p.add_argument("--truncate-prompt", action="store_true",
                   help="keep the last tokens of a prompt longer than the model's context (with a warning)")
    p.add_argument("--temperature", default=0.7, type=field_value(SAMPLING + "temperature"), help="0 = greedy")
    p.add_argument("--top-k", type=field_value(SAMPLING + "top_k"))
    p.add_argument("--top-p", default=0.9, type=field_value(SAMPLING + "top_p"))
    p.add_argument("--min-p", type=field_value(SAMPLING + "min_p"))
    p.add_argument("--epsilon", type=field_value(SAMPLING + "epsilon"),
                   help="epsilon sampling: drop tokens with probability < E")
    p.add_argument("--repetition-penalty", default=1.0, type=field_value(SAMPLING + "repetition_penalty"))
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=at_least(0), help="sampling seed (same seed, same text)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap prompts in the model's chat template (default: when the tokenizer has one); "
                        "with no prompt: a multi-turn terminal chat")
    p.add_argument("--system", help="system message for --chat")
    p.add_argument("--tokenizer", help="tokenizer file/folder when the model has none beside it")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--quantize", default="auto", choices=["auto", "none", "int8", "int4"],
                   help="auto: keep a GGUF file's 4/8-bit weights quantized (packed int4 / int8 kernels) and fuse "
                        "projections; none: float weights; int8 / int4: quantize any model (lmlab/model/quantize.py)")
    p.add_argument("--speculative", metavar="prompt-lookup|MODEL",
                   help="speculative decoding: n-gram prompt lookup, or a draft model with the same vocabulary")
    p.add_argument("--draft-tokens", type=at_least(1), default=3,
                   help="draft tokens per speculative step (3: a verify forward of 4 tokens is one row block of the "
                        "CPU int4 kernel; wider ones cost more than they save there)")
    p.add_argument("--out", type=Path, help="write results as JSONL here (atomically)")
    p.add_argument("--no-stream", action="store_true", help="print results at the end only")
    p.set_defaults(func=run)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt texts, then the --batch-file's; neither = one empty prompt (unconditional sampling)."""
    from lmlab.errors import DataError
    from lmlab.fileio import read_text

    prompts = list(args.prompt or [])
    if args.batch_file:
        lines = read_text(args.batch_file, "prompt file").splitlines()
        start = len(prompts)
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    prompt = json.loads(line)["prompt"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    prompt = None
                if not isinstance(prompt, str):
                    raise DataError(f"{args.batch_file}:{n}: expected a JSON object with a 'prompt' string")
                prompts.append(prompt)
            else:
                prompts.append(line)
        if len(prompts) == start:
            raise DataError(f"{args.batch_file}: no prompts (the file is empty or blank); expected one prompt per line")
    return prompts or [""]


def _chat(loaded, cfg, args: argparse.Namespace, decoder) -> None:
    """The terminal chat loop: every turn is one `generate` call over the whole conversation."""
    from lmlab.errors import ConfigError
    from lmlab.generation.generate import encode_chat, generate

    tok, model = loaded.tokenizer, loaded.model
    if not tok.chat_template:
        raise ConfigError(f"{loaded.source}: the tokenizer has no chat template, so there is no chat to hold")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    print("lmlab chat: /reset clears the conversation, /bye or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/bye", "/exit", "/quit"):
            return
        if text == "/reset":
            history = []
            print("(conversation cleared)")
            continue
        if text.startswith("/"):
            print("commands: /reset (clear the conversation), /bye (quit)")
            continue
        history.append({"role": "user", "content": line})
        while len(history) > 1 and len(encode_chat(tok, system + history)) + cfg.max_new_tokens > model.config.max_seq_len:
            history = history[2:]  # the oldest exchange goes first
        prompt = tok.apply_chat_template(system + history, add_generation_prompt=True)
        try:
            answer = generate(model, tok, [prompt], cfg, chat=False, decoder=decoder,
                              stream=lambda _row, piece: print(piece, end="", flush=True))[0]
        except KeyboardInterrupt:
            print("\n(interrupted)")
            history.pop()
            continue
        print()
        history.append({"role": "assistant", "content": answer})


def run(args: argparse.Namespace) -> None:
    from lmlab.fileio import atomic_write_text, check_output_file
    from lmlab.generation.generate import GenerationConfig, generate
    from lmlab.generation.sampling import SamplingConfig
    from lmlab.generation.speculative import SpeculativeDecoder, make_drafter
    from lmlab.precision import inference_dtype, resolve_device
    from lmlab.weights.loading import load_model

    interactive = args.chat is True and not args.prompt and not args.batch_file
    prompts = _read_prompts(args)
    resolve_device(args.device, "--device")
    if args.out:
        check_output_file(args.out)  # before the model loads and the generation runs
    t0 = time.perf_counter()
    dtype = inference_dtype(args.dtype, args.device)
    loaded = load_model(args.model, device=args.device, dtype=dtype, tokenizer=args.tokenizer, quantize=args.quantize)
    load_s = time.perf_counter() - t0
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p if args.temperature else None, min_p=args.min_p,
                              epsilon=args.epsilon, repetition_penalty=args.repetition_penalty)
    cfg = GenerationConfig(args.max_new_tokens, sampling, stop_strings=tuple(args.stop), seed=args.seed,
                           truncate_prompt=args.truncate_prompt)
    tok = loaded.require_tokenizer("pass --tokenizer PATH")
    decoder = (SpeculativeDecoder(make_drafter(args.speculative, args.draft_tokens, loaded.model, dtype))
               if args.speculative else None)
    if interactive:
        return _chat(loaded, cfg, args, decoder)
    chat = args.chat if args.chat is not None else bool(tok.chat_template)
    streaming = len(prompts) == 1 and not args.no_stream
    stream = (lambda _row, text: print(text, end="", flush=True)) if streaming else None
    t1 = time.perf_counter()
    outputs = generate(loaded.model, tok, prompts, cfg, chat=chat, system=args.system, stream=stream, decoder=decoder)
    gen_s = time.perf_counter() - t1
    if streaming:
        print()
    else:
        for prompt, text in zip(prompts, outputs):
            print(f"### {prompt}\n{text}\n")
    n_tokens = sum(len(tok.encode(o)) for o in outputs)
    spec = ""
    if decoder is not None and decoder.stats["drafted"]:
        st = decoder.stats
        spec = f", {st['accepted']}/{st['drafted']} draft tokens accepted in {st['steps']} steps"
    print(f"[{loaded.source}: loaded in {load_s:.1f}s, {n_tokens} tokens in {gen_s:.1f}s{spec}]", file=sys.stderr)
    if args.out:
        rows = [json.dumps({"prompt": p, "output": o}) for p, o in zip(prompts, outputs)]
        atomic_write_text(args.out, "\n".join(rows) + "\n")
