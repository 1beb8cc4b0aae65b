"""Serving throughput and latency: `lmlab serve` vs llama-cpp-python's OpenAI server, same GGUF, same prompts.

Both servers run on 127.0.0.1 at once (each idle while the other is measured), with the embedded
SmolLM2-135M-Instruct Q4_1 GGUF: lmlab keeps it packed (`--quantize auto`, the default: packed int4 kernels,
fused projections, the few-call decode step of lmlab generate; `int8` dequantizes to int8 weights), llama.cpp
runs the Q4_1 file natively. For each concurrency (1, 4, 8, 16), `--requests-per-slot`
x concurrency streamed chat completions (Alpaca instructions, greedy, max_tokens 128) are sent with that
many in flight, alternating servers level by level so machine load hits both alike. Reported: total
output tokens/s (tokens counted with the model's own tokenizer on each answer, the same for both servers),
time to first token and time per output token after the first (p50, p95 over requests), and failures.

llama-cpp-python's server decodes one request at a time (its requests wait on a lock); it is started with
`--interrupt_requests False` so a new request queues instead of cutting off the running stream. On Intel
CPUs with AMX its defaults crash on the first prompt of more than one token (its AMX buffer type,
ggml-org/llama.cpp#20824); `--llama-cpp-plain-cpu` turns its extra (repacking) buffer types off, which runs
there, and `--llama-cpp-n-batch 1` feeds prompts one token per call on the AMX path.

    python benchmarks/serve.py [--levels 1 4 8 16] [--quantize auto] [--record]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from lmlab.paths import REPO_ROOT, data_dir, smollm2_gguf
from lmlab.precision import cpu_name
from lmlab.tokenization import load_tokenizer

MAX_TOKENS = 128  # default of --max-tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[:4]} exited: see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    raise SystemExit(f"{cmd[:4]} did not start in 300 s: see {log}")


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed chat completion: time to first content, end time, the text."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    first, text = None, ""
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": str(chunk["error"])[:200]}
                for choice in chunk.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content") or ""
                    if piece and first is None:
                        first = time.perf_counter()
                    text += piece
    except httpx.HTTPError as err:
        return {"error": f"{type(err).__name__}: {err}"}
    return {"start": t0, "first": first or time.perf_counter(), "end": time.perf_counter(), "text": text}


async def level(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int) -> list[dict]:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        async def bounded(p: str) -> dict:
            async with sem:
                return await one(client, url, model, p, max_tokens)

        return await asyncio.gather(*(bounded(p) for p in prompts))


def summarize(results: list[dict], tok, wall: float) -> dict:
    ok = [r for r in results if "error" not in r]
    n_tokens = [len(tok.encode(r["text"])) for r in ok]
    ttft = [r["first"] - r["start"] for r in ok]
    tpot = [(r["end"] - r["first"]) / (n - 1) for r, n in zip(ok, n_tokens) if n > 1]

    def pct(xs: list[float], q: float) -> float:
        return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else (xs or [0])[0]

    return {"tok_s": sum(n_tokens) / wall, "tokens": sum(n_tokens), "failed": len(results) - len(ok),
            "errors": sorted({r["error"] for r in results if "error" in r})[:3],
            "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95), "tpot_p50": pct(tpot, 50), "tpot_p95": pct(tpot, 95)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--requests-per-slot", type=int, default=2, help="requests per level = this x concurrency")
    ap.add_argument("--min-requests", type=int, default=8)
    ap.add_argument("--quantize", default="auto", choices=["auto", "none", "int8"], help="lmlab's weights")
    ap.add_argument("--speculative", help="lmlab serve --speculative (e.g. prompt-lookup)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--llama-cpp-n-batch", type=int, default=512,
                    help="llama.cpp's n_batch / n_ubatch (1 where its AMX path crashes on longer prompts)")
    ap.add_argument("--llama-cpp-plain-cpu", action="store_true",
                    help="llama.cpp without its extra buffer types (use_extra_bufts off: no AMX / repacking)")
    ap.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args()
    gguf = smollm2_gguf()
    tok = load_tokenizer(gguf)
    alpaca = [r["instruction"] for r in json.loads((data_dir() / "alpaca" / "alpaca_small.json").read_text())
              if not r["input"]]
    logs = Path("/tmp")
    servers = {}
    lport, cport = free_port(), free_port()
    lmlab_cmd = [sys.executable, "-m", "lmlab", "serve", "smollm2-135m-instruct", "--port", str(lport),
                 "--parallel", str(max(args.levels)), "--max-queue", "256", "--quantize", args.quantize,
                 "--log-level", "warning"] + (["--speculative", args.speculative] if args.speculative else [])
    # use_extra_bufts is not a server setting: the server module runs inside lmlab's context that sets it
    plain = ("import runpy\nfrom lmlab.compat.llama_cpp import no_extra_buffer_types\n"
             "with no_extra_buffer_types():\n    runpy.run_module('llama_cpp.server', run_name='__main__')")
    server = ["-c", plain] if args.llama_cpp_plain_cpu else ["-m", "llama_cpp.server"]
    cpp_cmd = [sys.executable, *server, "--model", str(gguf), "--model_alias", "smollm2",
               "--host", "127.0.0.1", "--port", str(cport), "--n_ctx", "2048", "--n_threads", str(args.threads),
               "--n_threads_batch", str(args.threads), "--interrupt_requests", "False", "--verbose", "False",
               "--n_batch", str(args.llama_cpp_n_batch), "--n_ubatch", str(args.llama_cpp_n_batch)]
    procs = [start(lmlab_cmd, lport, logs / "bench-lmlab-serve.log"), start(cpp_cmd, cport, logs / "bench-llama-cpp.log")]
    servers = {"lmlab serve": (f"http://127.0.0.1:{lport}", "smollm2-135m-instruct"),
               "llama-cpp-python server": (f"http://127.0.0.1:{cport}", "smollm2")}
    rows: dict[tuple[str, int], dict] = {}
    try:
        for name, (url, model) in servers.items():  # warm-up: first requests pay one-time costs
            asyncio.run(level(url, model, alpaca[:2], 2, args.max_tokens))
        for c in args.levels:
            prompts = alpaca[: max(args.min_requests, args.requests_per_slot * c)]
            for name, (url, model) in servers.items():
                t = time.perf_counter()
                results = asyncio.run(level(url, model, prompts, c, args.max_tokens))
                rows[(name, c)] = summarize(results, tok, time.perf_counter() - t)
                r = rows[(name, c)]
                print(f"{name:>24} c={c:<3} {r['tok_s']:7.1f} tok/s  ttft p50 {r['ttft_p50']:.2f}s p95 "
                      f"{r['ttft_p95']:.2f}s  tpot p50 {r['tpot_p50'] * 1000:.0f}ms p95 {r['tpot_p95'] * 1000:.0f}ms  "
                      f"failed {r['failed']} {r['errors']}", flush=True)
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=30)
    lines = ["| concurrency | server | requests | output tok/s | vs llama.cpp | TTFT p50 / p95 (s) | "
             "time per output token p50 / p95 (ms) | failed |", "|---:|---|---:|---:|---:|---|---|---:|"]
    for c in args.levels:
        ref = rows[("llama-cpp-python server", c)]["tok_s"]
        for name in servers:
            r = rows[(name, c)]
            n = max(args.min_requests, args.requests_per_slot * c)
            lines.append(f"| {c} | {name} | {n} | {r['tok_s']:.1f} | {r['tok_s'] / ref:.2f}x | "
                         f"{r['ttft_p50']:.2f} / {r['ttft_p95']:.2f} | {r['tpot_p50'] * 1000:.0f} / "
                         f"{r['tpot_p95'] * 1000:.0f} | {r['failed']} |")
    report = "\n".join(lines)
    print(report)
    if args.record:
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        header = (f"\n## Serving: lmlab serve vs llama-cpp-python server ({time.strftime('%Y-%m-%d')}, "
                  f"{cpu_name()}, {args.threads} threads, load after {load})\n\n"
                  f"SmolLM2-135M-Instruct, the same Q4_1 GGUF (lmlab: {args.quantize} weights"
                  f"{', --speculative ' + args.speculative if args.speculative else ''}; llama.cpp: Q4_1 native), "
                  f"streamed chat completions of Alpaca instructions, greedy, max_tokens {args.max_tokens}; command: "
                  f"`python benchmarks/serve.py {' '.join(sys.argv[1:])}`\n\n")
        with open(Path(__file__).with_name("RESULTS.md"), "a") as f:
            f.write(header + report + "\n")


if __name__ == "__main__":
    main()
