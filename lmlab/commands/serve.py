"""`lmlab serve [MODEL] [--adapter NAME=PATH ...]`: an OpenAI-compatible server with continuous batching."""

from __future__ import annotations

import argparse
import sys

DEFAULT_MODEL = "smollm2-135m-instruct"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching, adapters, chat page)")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"name, checkpoint folder, GGUF/llama2.c file or HF dir (default {DEFAULT_MODEL})")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="a LoRA adapter folder (lmlab or peft) served as model NAME (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require the header Authorization: Bearer KEY on /v1/*")
    p.add_argument("--name", help="the base model's id in the API (default: the model name, or the file's stem)")
    p.add_argument("--parallel", type=int, default=16, help="sequences decoded together (KV cache rows)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a row; more get 503")
    p.add_argument("--ctx-size", type=int, help="tokens per sequence, prompt + output (default: the model's, "
                   "at most 2048)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take")
    p.add_argument("--speculative", metavar="prompt-lookup|MODEL",
                   help="speculative decoding: n-gram prompt lookup, or a draft model with the same vocabulary")
    p.add_argument("--draft-tokens", type=int, default=5, help="draft tokens per speculative step")
    p.add_argument("--speculative-max-batch", type=int, default=4,
                   help="speculate only while at most this many sequences are live")
    p.add_argument("--tokenizer", help="tokenizer file/folder when the model has none beside it")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--quantize", default="none", choices=["none", "int8"],
                   help="int8: weight-only int8 linears for the layers no adapter changes")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def _adapters(specs: list[str]) -> list[tuple[str, str]]:
    from lmlab.errors import ConfigError

    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {spec!r}: expected NAME=PATH")
        out.append((name, path))
    return out


def build(args: argparse.Namespace):
    """The app for these arguments (tests build it in-process; `run` serves it)."""
    from pathlib import Path

    from lmlab.adapters.files import PEFT_WEIGHTS, import_peft, load_adapter
    from lmlab.errors import ConfigError, LmlabError
    from lmlab.generation.speculative import make_drafter
    from lmlab.precision import inference_dtype

    try:
        from lmlab.serve.app import Served, create_app
    except ImportError as err:  # fastapi / uvicorn are the `serve` extra
        raise LmlabError(f"lmlab serve needs {err.name}: pip install 'lmlab[serve]'") from None
    from lmlab.serve.engine import Engine, EngineConfig
    from lmlab.weights.loading import load_model

    dtype = inference_dtype(args.dtype, args.device)
    loaded = load_model(args.model, device=args.device, dtype=dtype, tokenizer=args.tokenizer)
    if loaded.tokenizer is None:
        raise ConfigError(f"{loaded.source}: no tokenizer found beside the model; pass --tokenizer")
    model = loaded.model
    adapters = _adapters(args.adapter)
    for name, path in adapters:
        reader = import_peft if (Path(path) / PEFT_WEIGHTS).is_file() else load_adapter
        reader(model, path, name=name)
    if args.quantize == "int8":
        from lmlab.model.quantize import quantize_int8

        quantize_int8(model, dtype)
    context = args.ctx_size or min(model.config.max_seq_len, 2048)
    if context < 2:
        raise ConfigError(f"--ctx-size {context}: expected at least 2 tokens")
    for flag, value in (("--parallel", args.parallel), ("--max-queue", args.max_queue), ("--draft-tokens", args.draft_tokens)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: expected a positive integer")
    drafter = make_drafter(args.speculative, args.draft_tokens, model, dtype) if args.speculative else None
    cfg = EngineConfig(max_batch=args.parallel, max_queue=args.max_queue, context=context, timeout_s=args.timeout,
                       speculative_max_batch=args.speculative_max_batch)
    engine = Engine(model, loaded.tokenizer, cfg, drafter=drafter)
    name = args.name or (Path(args.model).stem if Path(args.model).exists() else str(args.model))
    info = {"source": str(loaded.source), "n_params": model.num_params(), "dtype": str(dtype).removeprefix("torch."),
            "speculative": args.speculative}
    return create_app(Served(engine, loaded.tokenizer, name, [n for n, _ in adapters], args.api_key, info))


def run(args: argparse.Namespace) -> None:
    app = build(args)
    import uvicorn

    engine = app.state.served.engine.start()
    models = [app.state.served.name, *app.state.served.adapters]
    print(f"lmlab serve: {models} on http://{args.host}:{args.port} (chat page at /, API at /v1)", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.close()
