"""`lmlab serve [MODEL] [--adapter NAME=PATH ...]`: an OpenAI-compatible server with continuous batching."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from lmlab.commands._args import at_least, between, positive_number

DEFAULT_MODEL = "smollm2-135m-instruct"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching, adapters, chat page)")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"name, checkpoint folder, GGUF/llama2.c file or HF dir (default {DEFAULT_MODEL})")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="a LoRA adapter folder (lmlab or peft) served as model NAME (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=between(0, 65535), default=8000)
    p.add_argument("--api-key", help="require the header Authorization: Bearer KEY on /v1/*")
    p.add_argument("--name", help="the base model's id in the API (default: the model name, or the file's stem)")
    p.add_argument("--parallel", type=at_least(1), default=16, help="sequences decoded together (KV cache rows)")
    p.add_argument("--max-queue", type=at_least(1), default=64, help="requests that may wait for a row; more get 503")
    p.add_argument("--ctx-size", type=at_least(2), help="tokens per sequence, prompt + output (default: the model's, "
                   "at most 2048)")
    p.add_argument("--timeout", type=positive_number, default=600.0, help="seconds a request may take")
    p.add_argument("--speculative", metavar="prompt-lookup|MODEL",
                   help="speculative decoding: n-gram prompt lookup, or a draft model with the same vocabulary")
    p.add_argument("--draft-tokens", type=at_least(1), default=3,
                   help="draft tokens per speculative step (3: a verify forward of 4 tokens is one row block of the "
                        "CPU int4 kernel; wider ones cost more than they save there)")
    p.add_argument("--speculative-max-batch", type=at_least(1), default=4,
                   help="speculate only while at most this many sequences are live")
    p.add_argument("--tokenizer", help="tokenizer file/folder when the model has none beside it")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--quantize", default="auto", choices=["auto", "none", "int8"],
                   help="auto: as lmlab generate (a GGUF's 4/8-bit weights kept packed, projections fused, the "
                        "few-call decode step); with --adapter on CPU, int8 for the layers no adapter changes (LoRA needs "
                        "the unfused projections); none: float weights; int8: weight-only int8 linears")
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

    from lmlab.adapters.files import load_adapter
    from lmlab.errors import ConfigError, LmlabError
    from lmlab.generation.speculative import make_drafter
    from lmlab.precision import inference_dtype, resolve_device

    try:
        from lmlab.serve.app import Served, create_app
    except ImportError as err:  # fastapi / uvicorn are the `serve` extra
        raise LmlabError(f"lmlab serve needs {err.name}: pip install 'lmlab[serve]'") from None
    from lmlab.serve.engine import Engine, EngineConfig
    from lmlab.weights.loading import load_model

    adapters = _adapters(args.adapter)  # a bad flag fails before the model loads
    resolve_device(args.device, "--device")
    dtype = inference_dtype(args.dtype, args.device)
    packed = args.quantize == "auto" and not adapters  # adapters attach to float, unfused projections
    loaded = load_model(args.model, device=args.device, dtype=dtype, tokenizer=args.tokenizer,
                        quantize="auto" if packed else "none")
    if loaded.tokenizer is None:
        raise ConfigError(f"{loaded.source}: no tokenizer found beside the model; pass --tokenizer")
    model = loaded.model
    for name, path in adapters:
        load_adapter(model, path, name=name)  # lmlab or peft, told apart by the config
    if args.quantize == "int8" or (args.quantize == "auto" and adapters and model.device.type == "cpu"):
        from lmlab.model.quantize import quantize_int8

        quantize_int8(model, dtype)
    context = args.ctx_size or min(model.config.max_seq_len, 2048)
    if context > model.config.max_seq_len:
        raise ConfigError(f"--ctx-size {context}: {loaded.source} was trained for {model.config.max_seq_len} "
                          f"tokens; expected at most that")
    drafter = make_drafter(args.speculative, args.draft_tokens, model, dtype) if args.speculative else None
    cfg = EngineConfig(max_batch=args.parallel, max_queue=args.max_queue, context=context, timeout_s=args.timeout,
                       speculative_max_batch=args.speculative_max_batch)
    engine = Engine(model, loaded.tokenizer, cfg, drafter=drafter)
    name = args.name or (Path(args.model).stem if Path(args.model).exists() else str(args.model))
    info = {"source": str(loaded.source), "n_params": model.num_params(), "dtype": str(dtype).removeprefix("torch."),
            "speculative": args.speculative}
    return create_app(Served(engine, loaded.tokenizer, name, [n for n, _ in adapters], args.api_key, info))


def run(args: argparse.Namespace) -> None:
    """uvicorn in a helper thread, the decode loop on the main thread (lmlab/serve/engine.py says why: the
    same step runs ~4x slower in a second thread). Ctrl-C or SIGTERM stops both; so does a server that fails
    to start (e.g. the port is taken), with its exit status."""
    app = build(args)
    import uvicorn

    engine = app.state.served.engine
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
    failed: list[int] = []

    def serve() -> None:
        try:
            server.run()
        except SystemExit as exit:  # uvicorn exits when it cannot bind
            failed.append(int(exit.code or 1))
        except BaseException:
            failed.append(1)
            raise
        finally:
            engine.close()

    models = [app.state.served.name, *app.state.served.adapters]
    print(f"lmlab serve: {models} on http://{args.host}:{args.port} (chat page at /, API at /v1)", file=sys.stderr)
    signal.signal(signal.SIGTERM, _interrupt)
    thread = threading.Thread(target=serve, name="lmlab-http", daemon=True)
    thread.start()
    try:
        engine.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        engine.close()
        thread.join(timeout=30)
    if failed:
        raise SystemExit(failed[0])


def _interrupt(signum: int, frame) -> None:
    """SIGTERM stops the server as Ctrl-C does (the loop on the main thread sees KeyboardInterrupt)."""
    raise KeyboardInterrupt
