"""Generation speed: lmlab vs transformers (vs llama-cpp-python when installed) on the same weights.

SmolLM2-135M-Instruct (the embedded Q4_1 GGUF, dequantized), a 208-token prompt, 128 greedy new
tokens. Reports prompt tokens/s (prefill), decode tokens/s at batch 1 and batch 8 (total over the
batch), the ratios, and appends the table to benchmarks/RESULTS.md with --record.

    python benchmarks/generate.py [--skip-transformers] [--record]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from lmlab.generation.generate import GenerationConfig, generate_ids
from lmlab.generation.sampling import SamplingConfig
from lmlab.model.quantize import quantize_int8
from lmlab.paths import data_dir, smollm2_gguf
from lmlab.weights.loading import load_model

PROMPT_TOKENS, NEW_TOKENS = 208, 128


def make_prompt(tokenizer) -> list[int]:
    text = (data_dir() / "tinystories" / "tinystories_val.txt").read_text()[:5000]
    ids = tokenizer.encode(text)[:PROMPT_TOKENS]
    assert len(ids) == PROMPT_TOKENS
    return ids


def _best(fn, repeats: int = 2) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_lmlab(dtype: torch.dtype, prompt: list[int], int8: bool = False) -> dict[str, float]:
    model = load_model("smollm2-135m-instruct", dtype=dtype).model
    if int8:
        quantize_int8(model, dtype)

    def run(batch: int, n: int) -> None:
        out = generate_ids(model, [prompt] * batch, GenerationConfig(n, SamplingConfig(temperature=0)))
        assert all(len(o) == n for o in out)

    return _measure(run)


def _measure(run) -> dict[str, float]:
    """prefill = time to first token; decode = (time for 1+N tokens - prefill) per token."""
    res = {}
    prefill = _best(lambda: run(1, 1))
    res["prompt_tok_s"] = PROMPT_TOKENS / prefill
    for batch in (1, 8):
        first = prefill if batch == 1 else _best(lambda: run(batch, 1))
        total = _best(lambda: run(batch, NEW_TOKENS + 1), repeats=1)
        res[f"decode_b{batch}_tok_s"] = batch * NEW_TOKENS / (total - first)
    return res


def bench_transformers(prompt: list[int]) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=torch.float32)
    model.eval()

    def run(batch: int, n: int) -> None:
        ids = torch.tensor([prompt] * batch)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
        assert out.shape[1] == PROMPT_TOKENS + n

    return _measure(run)


def bench_llama_cpp(prompt: list[int]) -> dict[str, float] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(str(smollm2_gguf()), n_ctx=512, n_threads=torch.get_num_threads(), verbose=False)

    def run(batch: int, n: int) -> None:
        assert batch == 1
        llm.reset()
        out = []
        for tok in llm.generate(prompt, temp=0.0, reset=True):
            out.append(tok)
            if len(out) == n:
                break

    prefill = _best(lambda: run(1, 1))
    total = _best(lambda: run(1, NEW_TOKENS + 1), repeats=1)
    return {"prompt_tok_s": PROMPT_TOKENS / prefill, "decode_b1_tok_s": NEW_TOKENS / (total - prefill)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args()
    tok = load_model("smollm2-135m-instruct").tokenizer
    prompt = make_prompt(tok)
    rows = {"lmlab int8": bench_lmlab(torch.bfloat16, prompt, int8=True),
            "lmlab bf16": bench_lmlab(torch.bfloat16, prompt), "lmlab fp32": bench_lmlab(torch.float32, prompt)}
    if not args.skip_transformers:
        rows["transformers fp32"] = bench_transformers(prompt)
    cpp = bench_llama_cpp(prompt)
    if cpp:
        rows["llama.cpp Q4_1"] = cpp
    cols = ["prompt_tok_s", "decode_b1_tok_s", "decode_b8_tok_s"]
    lines = [f"| engine | {' | '.join(cols)} |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.1f}" if c in r else "-" for c in cols) + " |")
    ratios = []
    if "transformers fp32" in rows:
        ref = rows["transformers fp32"]
        for name in ("lmlab int8", "lmlab bf16"):
            for c in cols:
                ratios.append(f"{name} / transformers fp32, {c}: {rows[name][c] / ref[c]:.2f}x")
    if cpp:
        for name in ("lmlab int8", "lmlab bf16"):
            ratios.append(
                f"{name} batch-8 total / llama.cpp batch-1: {rows[name]['decode_b8_tok_s'] / cpp['decode_b1_tok_s']:.2f}x"
            )
    report = "\n".join(lines + [""] + [f"- {r}" for r in ratios])
    print(report)
    if args.record:
        header = (f"\n## Generation ({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
                  f"{torch.get_num_threads()} threads, torch {torch.__version__})\n\n"
                  f"SmolLM2-135M-Instruct, {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} greedy new tokens.\n\n")
        path = Path(__file__).with_name("RESULTS.md")
        with open(path, "a") as f:
            f.write(header + report + "\n")


if __name__ == "__main__":
    main()
