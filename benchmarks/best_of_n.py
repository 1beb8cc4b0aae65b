"""K samples per prompt: one shared prefill (generate_ids(num_samples=K)) against the prompt repeated K times,
on GSM8K prompts with SmolLM2-135M-Instruct, same row seeds (so the same tokens up to rounding: counted). Prints the time
of each and the ratio, measured interleaved in one process (a shared machine: compare within a run).

    python benchmarks/best_of_n.py --prompts 2 --k 16 --new-tokens 32 --rounds 2
Writes the section "## Best-of-N sampling" of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from sft_alpaca import write_section  # noqa: E402

HEADING = "## Best-of-N sampling"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--results", default=str(Path(__file__).parent / "RESULTS.md"))
    args = ap.parse_args()
    import torch

    from lmlab.data.instruct import Template
    from lmlab.generation.generate import GenerationConfig, encode_prompt, generate_ids
    from lmlab.generation.sampling import SamplingConfig
    from lmlab.precision import inference_dtype
    from lmlab.tasks.verifier import problems
    from lmlab.weights.loading import load_model

    loaded = load_model(args.model, dtype=torch.float32)
    model, tok = loaded.model.to(inference_dtype("auto")).eval(), loaded.tokenizer
    items = problems("", args.prompts, 0, "test")
    prompts = [encode_prompt(tok, Template("chat").prompt(rec, tok)) for _, rec in items]
    seeds = list(range(args.prompts * args.k))
    cfg = GenerationConfig(args.new_tokens, SamplingConfig(temperature=0.7), stop_ids=())  # fixed length
    times: dict[str, list[float]] = {"shared prefill": [], "prompt repeated K times": []}
    for _ in range(args.rounds):
        t = time.perf_counter()
        shared = generate_ids(model, prompts, cfg, num_samples=args.k, row_seeds=seeds)
        times["shared prefill"].append(time.perf_counter() - t)
        t = time.perf_counter()
        repeated = generate_ids(model, [p for p in prompts for _ in range(args.k)], cfg, row_seeds=seeds)
        times["prompt repeated K times"].append(time.perf_counter() - t)
        same = sum(a == b for a, b in zip(shared, repeated))
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = ["| path | median s | generated tokens/s |", "|---|---:|---:|"]
    n = args.prompts * args.k * args.new_tokens
    rows += [f"| {k} | {v:.1f} | {n / v:.0f} |" for k, v in med.items()]
    ratio = med["prompt repeated K times"] / med["shared prefill"]
    load = os.getloadavg()[0]
    note = (f"{args.model}, {args.prompts} GSM8K test prompts ({', '.join(str(len(p)) for p in prompts)} tokens, chat "
            f"template) x K={args.k} samples x {args.new_tokens} new tokens, temperature 0.7, per-row seeds ({same} of "
            f"{len(shared)} rows token-identical between the paths: bf16 prefills of a different batch shape may "
            f"round differently); median of {args.rounds} interleaved rounds; torch threads "
            f"{torch.get_num_threads()}, load average {load:.1f}. Shared prefill is **{ratio:.2f}x** the speed of "
            "repeating the prompt.")
    print(note + "\n" + "\n".join(rows))
    write_section(note + "\n\n" + "\n".join(rows), HEADING, Path(args.results))


if __name__ == "__main__":
    main()
