"""Speculative decoding at batch 1: tokens/s with and without, and the acceptance rate.

SmolLM2-135M-Instruct (the embedded GGUF), greedy, chat template. Two prompt sets: DialogSum summaries
(grounded: a summary copies names and phrases of the dialogue, which prompt lookup can draft) and
open-ended Alpaca instructions (little to copy). Each prompt is decoded plainly and with every drafter in
turn (interleaved, so machine load hits all alike); the speedup is the ratio of total tokens/s, the median
of per-prompt ratios beside it. Greedy outputs are checked equal to plain decoding.

The bound beside each prompt-lookup row: its drafts replayed on the plain greedy output (the tokens per target
forward it would get if a verify forward cost no more than a plain step; in fp32, where the outputs are equal,
this is exactly the drafter's tokens per forward). The verify cost table times `FastDecoder.forward_tokens`
over 2..9 tokens against a plain step on the same cache: tokens per forward / cost is what speculation can
give at best on this machine.

The target runs as `lmlab generate` runs it by default (`--quantize auto`: the GGUF's Q4_1 kept as packed
int4, plain steps and verify forwards in the few-call decode path, lmlab/model/decode.py), or with float
(`none`) or int8 weights. Drafters: prompt lookup with k draft tokens, and (with float or int8 targets) a
draft model: SmolLM2 itself with int8 weights (lmlab/model/quantize.py), the only smaller model with this
vocabulary here.

    python benchmarks/speculative.py [--prompts 20] [--max-new 128] [--quantize auto] [--record]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from lmlab.data.tasks import dialogsum_records
from lmlab.generation.generate import GenerationConfig, _cache_dtype, encode_prompt, generate_ids
from lmlab.generation.sampling import SamplingConfig
from lmlab.generation.speculative import DraftModel, PromptLookup, lookup_draft, speculative_generate_ids
from lmlab.model.decode import FastDecoder
from lmlab.model.kv_cache import KVCache
from lmlab.model.quantize import quantize_int8
from lmlab.paths import data_dir
from lmlab.precision import cpu_name, inference_dtype
from lmlab.weights.loading import load_model


def prompt_sets(tok, n: int) -> dict[str, list[list[int]]]:
    dialogs = dialogsum_records(data_dir() / "dialogsum" / "dialogsum.dev.jsonl")[:n]
    alpaca = [r for r in json.loads((data_dir() / "alpaca" / "alpaca_small.json").read_text()) if not r["input"]][:n]
    return {
        "DialogSum": [encode_prompt(tok, f"{r['instruction']}\n\n{r['input']}", chat=True) for r in dialogs],
        "open-ended (Alpaca)": [encode_prompt(tok, r["instruction"], chat=True) for r in alpaca],
    }


def timed(fn) -> tuple[float, list[int], dict]:
    stats: dict = {}
    t = time.perf_counter()
    out = fn(stats)
    return time.perf_counter() - t, out, stats


def replay(prompt: list[int], plain: list[int], drafter: PromptLookup, max_new: int) -> tuple[int, int]:
    """(tokens, target forwards) of prompt lookup replayed on the plain greedy output, counted as the
    decoding loop counts them: the first token comes from the prefill, then each forward emits the drafts
    that match the output plus one token."""
    history, i, forwards = [*prompt, *plain[:1]], 1, 0
    while i < len(plain):
        draft = lookup_draft(history, min(drafter.k, max_new - i - 1), drafter.max_ngram, drafter.min_ngram)
        a = 0
        while a < len(draft) and i + a < len(plain) and draft[a] == plain[i + a]:
            a += 1
        history += plain[i : i + a + 1]
        i, forwards = i + a + 1, forwards + 1
    return len(plain), forwards + (len(plain) < max_new)  # (+ the forward that yields the stop token)


@torch.inference_mode()
def verify_costs(model, widths: range, prompt_len: int = 300, repeats: int = 15) -> dict[int, float]:
    """Median time of a T-token verify forward / a plain 1-token step, batch 1, on a cache of prompt_len."""
    fast = FastDecoder(model, max(widths))
    cache = KVCache(model.config, 1, prompt_len + repeats * (1 + sum(widths)), dtype=_cache_dtype(model, model.device))
    model(torch.arange(100, 100 + prompt_len)[None], None, cache=cache, last_only=True)
    g = torch.Generator().manual_seed(0)

    def median_ms(T: int) -> float:
        times = []
        for _ in range(repeats):
            ids = torch.randint(100, 1000, (1, T), generator=g)
            cache.make_room(T, 1)
            t = time.perf_counter()
            fast.step(ids[:, 0], cache) if T == 1 else fast.forward_tokens(ids, torch.ones(1, T, dtype=torch.bool), cache)
            times.append(time.perf_counter() - t)
            cache.discard(torch.tensor([1]), T)  # the rest become masked holes, as rejected drafts do
        return statistics.median(times)

    one = median_ms(1)
    return {T: median_ms(T) / one for T in widths}


def bench(model, drafters: dict, prompts: list[list[int]], cfg: GenerationConfig, stop: tuple[int, ...]) -> dict:
    cfg = GenerationConfig(cfg.max_new_tokens, cfg.sampling, stop, seed=cfg.seed)
    rows = {name: {"time": 0.0, "tokens": 0, "drafted": 0, "accepted": 0, "steps": 0, "ratios": [], "same": 0,
                   "replay_tokens": 0, "replay_forwards": 0} for name in ["plain", *drafters]}
    for prompt in prompts:
        t_plain, plain, _ = timed(lambda s, prompt=prompt: generate_ids(model, [prompt], cfg)[0])
        rows["plain"]["time"] += t_plain
        rows["plain"]["tokens"] += len(plain)
        for name, make in drafters.items():
            drafter = make()  # (a fresh one per run: a draft model keeps a cache per call)
            t, out, stats = timed(lambda s, prompt=prompt, drafter=drafter:
                                  speculative_generate_ids(model, [prompt], cfg, drafter, stats=s)[0])
            r = rows[name]
            r["time"] += t
            r["tokens"] += len(out)
            r["same"] += out == plain
            r["ratios"].append((len(out) / t) / (len(plain) / t_plain))
            for key in ("drafted", "accepted", "steps"):
                r[key] += stats[key]
            if isinstance(drafter, PromptLookup):
                tokens, forwards = replay(prompt, plain, drafter, cfg.max_new_tokens)
                r["replay_tokens"] += tokens
                r["replay_forwards"] += forwards
    return rows


def table(name: str, rows: dict, n_prompts: int) -> list[str]:
    base = rows["plain"]["tokens"] / rows["plain"]["time"]
    lines = [f"| {name} | decoding | tokens/s | speedup (total) | speedup (median prompt) | acceptance | "
             "tokens per target forward | replayed on plain output | greedy output = plain |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in rows.items():
        tps = r["tokens"] / r["time"]
        if label == "plain":
            lines.append(f"| | plain | {tps:.1f} | 1.00x | | | 1.00 | | |")
            continue
        acc = r["accepted"] / r["drafted"] if r["drafted"] else 0.0
        bound = f"{r['replay_tokens'] / r['replay_forwards']:.2f}" if r["replay_forwards"] else "-"
        lines.append(f"| | {label} | {tps:.1f} | {tps / base:.2f}x | {statistics.median(r['ratios']):.2f}x | "
                     f"{acc:.2f} | {r['tokens'] / max(r['steps'], 1):.2f} | {bound} | {r['same']}/{n_prompts} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=20, help="prompts per set")
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantize", default="auto", choices=["auto", "none", "int8"], help="the target's weights")
    ap.add_argument("--k", type=int, nargs="+", default=[3, 5], help="prompt-lookup draft tokens")
    ap.add_argument("--min-ngram", type=int, nargs="+", default=[1, 2], help="prompt-lookup shortest match")
    ap.add_argument("--no-draft-model", action="store_true")
    ap.add_argument("--record", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    args = ap.parse_args()
    dtype = inference_dtype(args.dtype)
    loaded = load_model("smollm2-135m-instruct", dtype=dtype, quantize="auto" if args.quantize == "auto" else "none")
    model, tok = loaded.model, loaded.tokenizer
    draft = None if args.no_draft_model or args.quantize == "auto" else quantize_int8(copy.deepcopy(model), dtype)
    if args.quantize == "int8":
        quantize_int8(model, dtype)
    drafters = {f"prompt lookup, k={k}, n-gram >= {n}": (lambda k=k, n=n: PromptLookup(k, min_ngram=n))
                for k in args.k for n in args.min_ngram}
    if draft is not None:
        drafters["draft model (int8 copy), k=4"] = lambda: DraftModel(draft, 4)
    cfg = GenerationConfig(args.max_new, SamplingConfig(temperature=0))
    stop = tuple(tok.stop_ids)
    costs = verify_costs(model, range(2, max(args.k) + 2))
    report = ["| verify forward, tokens | " + " | ".join(map(str, costs)) + " |",
              "|---|" + "---:|" * len(costs),
              "| time / plain step | " + " | ".join(f"{c:.2f}" for c in costs.values()) + " |", ""]
    print("\n".join(report), flush=True)
    for name, prompts in prompt_sets(tok, args.prompts).items():
        rows = bench(model, drafters, prompts, cfg, stop)
        report += table(name, rows, len(prompts)) + [""]
        print("\n".join(report), flush=True)
    if args.record:
        load = " ".join(f"{x:.1f}" for x in __import__("os").getloadavg())
        header = (f"\n## Speculative decoding, batch 1 ({time.strftime('%Y-%m-%d')}, "
                  f"{cpu_name()}, {torch.get_num_threads()} threads, load {load})\n\n"
                  f"SmolLM2-135M-Instruct {str(dtype).removeprefix('torch.')}"
                  f"{' int8 weights' if args.quantize == 'int8' else ''}"
                  f"{' (--quantize auto: Q4_1 packed int4)' if args.quantize == 'auto' else ''}, greedy, chat template, up to "
                  f"{args.max_new} new tokens, {args.prompts} prompts per set; command: "
                  f"`python benchmarks/speculative.py {' '.join(__import__('sys').argv[1:])}`\n\n")
        with open(Path(__file__).with_name("RESULTS.md"), "a") as f:
            f.write(header + "\n".join(report))


if __name__ == "__main__":
    main()
