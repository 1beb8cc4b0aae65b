"""A decode step over a batch whose requests ask for different LoRA adapters: per-row deltas in one forward
(`adapters_per_row`, what lmlab serve does) vs one forward per adapter group (what a server that switches
the active adapter must do), vs the base model alone.

SmolLM2-135M-Instruct, 8 rows with a 256-token context, adapters of rank 16 on wq, wv (the QA/SFT recipes'
shape); each mode is timed over interleaved rounds and the median step is reported.

    python benchmarks/adapters_batch.py [--rows 8] [--adapters 1 2 4 8] [--record]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from lmlab.adapters.lora import LoRAConfig, adapters_per_row, add_adapter, set_active_adapter
from lmlab.model.kv_cache import KVCache
from lmlab.precision import cpu_name, inference_dtype
from lmlab.weights.loading import load_model

CONTEXT = 256


def filled_cache(model, rows: int) -> KVCache:
    cache = KVCache(model.config, rows, CONTEXT + 64)
    model(torch.randint(0, 1000, (rows, CONTEXT)), cache=cache)
    return cache


def step(model, cache: KVCache, rows: int) -> None:
    model(torch.randint(0, 1000, (rows, 1)), cache=cache, last_only=True)
    cache.discard(torch.zeros(rows, dtype=torch.long), 1)  # keep the context length fixed


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    dtype = inference_dtype("auto")
    model = load_model("smollm2-135m-instruct", dtype=dtype).model
    for i in range(max(args.adapters)):
        add_adapter(model, f"a{i}", LoRAConfig(rank=16, alpha=32, target_modules=["wq", "wv"]))
    set_active_adapter(model, None)
    B = args.rows
    lines = ["| adapters in the batch | base alone (ms) | per-row deltas, one forward (ms) | "
             "one forward per adapter (ms) | per-row / base | grouped / per-row |", "|---:|---:|---:|---:|---:|---:|"]
    for n in args.adapters:
        names = [f"a{i % n}" for i in range(B)]
        groups = [sum(1 for x in names if x == f"a{i}") for i in range(n)]
        big = filled_cache(model, B)
        small = [filled_cache(model, g) for g in groups]
        times: dict[str, list[float]] = {"base": [], "per-row": [], "grouped": []}
        for _ in range(args.rounds):
            t = time.perf_counter()
            step(model, big, B)
            times["base"].append(time.perf_counter() - t)
            t = time.perf_counter()
            with adapters_per_row(model, names):
                step(model, big, B)
            times["per-row"].append(time.perf_counter() - t)
            t = time.perf_counter()
            for i, (cache, g) in enumerate(zip(small, groups)):
                set_active_adapter(model, f"a{i}")
                step(model, cache, g)
            set_active_adapter(model, None)
            times["grouped"].append(time.perf_counter() - t)
        med = {k: statistics.median(v[2:]) * 1000 for k, v in times.items()}
        lines.append(f"| {n} | {med['base']:.1f} | {med['per-row']:.1f} | {med['grouped']:.1f} | "
                     f"{med['per-row'] / med['base']:.2f}x | {med['grouped'] / med['per-row']:.2f}x |")
        print(lines[-1], flush=True)
    report = "\n".join(lines)
    print(report)
    if args.record:
        load = " ".join(f"{x:.1f}" for x in __import__("os").getloadavg())
        header = (f"\n## Mixed-adapter decode step ({time.strftime('%Y-%m-%d')}, "
                  f"{cpu_name()}, {torch.get_num_threads()} threads, load {load})\n\n"
                  f"SmolLM2-135M-Instruct {str(dtype).removeprefix('torch.')}, {B} rows, context {CONTEXT}, "
                  f"LoRA r 16 on wq, wv; median of {args.rounds - 2} interleaved rounds; command: "
                  f"`python benchmarks/adapters_batch.py`\n\n")
        with open(Path(__file__).with_name("RESULTS.md"), "a") as f:
            f.write(header + report + "\n")


if __name__ == "__main__":
    main()
