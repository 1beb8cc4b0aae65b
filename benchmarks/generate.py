"""Generation speed, memory and quality: lmlab vs llama.cpp (llama-cpp-python) on the same GGUF, in one run.

SmolLM2-135M-Instruct (the embedded Q4_1 GGUF), a 208-token prompt, 128 greedy new tokens. Engines:
- `lmlab` with its default settings (`lmlab generate` = `--quantize auto`: the file's Q4_1 blocks as packed
  int4, its Q8_0 embedding as the int8 output head, the kernels' bf16 activations, the few-call decode step;
  the dtype `lmlab generate` picks: bf16 where the CPU has native bf16, else fp32);
- `lmlab int8` (`--quantize int8`: dequantized and requantized per channel, the previous fast setting);
- `llama.cpp` (llama-cpp-python, the same file, as many threads as torch uses, its default settings). Where
  that process crashes (llama.cpp's AMX buffer type segfaults on prompts of more than one token on some Intel
  CPUs with AMX, with 2 threads: ggml-org/llama.cpp#20824), two working variants run instead:
  `llama.cpp n_batch 1` (the AMX path, the prompt fed one token per call) and `llama.cpp no repack`
  (`use_extra_bufts` off: the plain CPU path, prompt in one batch); lmlab is compared with the best of them
  in each column;
- with --all also `lmlab bf16` (`--quantize none`) and transformers (fp32, its own GGUF reader).
Each round runs every engine once, each in a fresh process of its own (interleaved: the machine is shared,
a noisy neighbour hurts all alike; and one process per engine, because two OpenMP thread teams in one
process - torch's and ggml's - slow each other: idle workers of one team park while the other runs);
the table shows medians over rounds. Reported: prefill tokens/s (208 / time to the first token), decode
tokens/s at batch 1 and batch 8 (total over the batch; llama-cpp-python decodes one sequence), load time
(file -> ready model and tokenizer in a fresh process, after the imports; median of the rounds), resident
memory (that process's RSS after loading and generating minus its RSS after the imports; peak in brackets) and memory-bandwidth
utilisation (bytes of weights read per token x batch-1 tokens/s / the copy bandwidth measured in this run,
counted as bytes read + written per second, as STREAM does).

With --quality: WikiText-2 test perplexity (first --ppl-tokens tokens, windows of 512) and greedy
continuations of 5 prompts for 32 tokens, lmlab default vs the same GGUF dequantized to fp32.

    python benchmarks/generate.py [--rounds 5] [--quality] [--all] [--record]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lmlab.compat.llama_cpp import no_extra_buffer_types
from lmlab.generation.generate import GenerationConfig, encode_prompt, generate_ids
from lmlab.generation.sampling import SamplingConfig
from lmlab.paths import data_dir, smollm2_gguf
from lmlab.precision import cpu_has_bf16, cpu_name
from lmlab.tokenization import load_tokenizer
from lmlab.weights.loading import load_model

PROMPT_TOKENS, NEW_TOKENS = 208, 128
SPEC = "smollm2-135m-instruct"
# engine -> (--quantize, --dtype); None = lmlab generate's default dtype (bf16 where the CPU has native bf16, else
# fp32: the quantized kernels take bf16 activations either way)
LMLAB = {"lmlab": ("auto", None), "lmlab int8": ("int8", None), "lmlab bf16": ("none", "bf16")}
QUALITY_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a little robot",
                   "Give three tips for staying healthy.", "The theory of relativity says that"]
RESULTS = Path(__file__).with_name("RESULTS.md")
HEADING = "## Generation"


def make_prompt(tokenizer) -> list[int]:
    text = (data_dir() / "tinystories" / "tinystories_val.txt").read_text()[:5000]
    ids = tokenizer.encode(text)[:PROMPT_TOKENS]
    assert len(ids) == PROMPT_TOKENS
    return ids


def copy_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """Bytes read + written per second by one large tensor copy with torch's threads (best of `repeats`)."""
    src = torch.ones(mb << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * src.numel() / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---- engines: each loads once, then `run(batch)` returns (prefill s, decode tokens/s total)

class Lmlab:
    def __init__(self, quantize: str, dtype: str | None) -> None:
        self.quantize, self.dtype = quantize, dtype
        self.load_s = _timed(self._load)
        self.weight_bytes = _weight_bytes(self.model)

    def _load(self) -> None:
        loaded = load_model(SPEC, quantize=self.quantize, dtype=self.dtype)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer

    def run(self, prompt: list[int], batch: int) -> tuple[float, float]:
        stamps: list[float] = []
        cfg = GenerationConfig(NEW_TOKENS, SamplingConfig(temperature=0))
        t0 = time.perf_counter()
        out = generate_ids(self.model, [prompt] * batch, cfg, on_token=lambda row, _t: row == 0 and stamps.append(
            time.perf_counter()))
        assert all(len(o) == NEW_TOKENS for o in out)
        return stamps[0] - t0, batch * (NEW_TOKENS - 1) / (stamps[-1] - stamps[0])


# engine -> (n_batch, extra buffer types): llama.cpp's defaults, and the variants that run where they crash
LLAMACPP = {"llama.cpp": (512, True), "llama.cpp n_batch 1": (1, True), "llama.cpp no repack": (512, False)}
LLAMACPP_FALLBACKS = ["llama.cpp n_batch 1", "llama.cpp no repack"]


class LlamaCpp:
    def __init__(self, n_batch: int, extra_buffers: bool) -> None:
        from llama_cpp import Llama

        self.cls, self.n_batch, self.extra_buffers = Llama, n_batch, extra_buffers
        self.load_s = _timed(self._load)
        self.weight_bytes = sum(t.n_bytes for t in _gguf_tensors())  # token_embd doubles as the output head

    def _load(self) -> None:
        with contextlib.nullcontext() if self.extra_buffers else no_extra_buffer_types():
            self.llm = self.cls(str(smollm2_gguf()), n_ctx=512, n_batch=self.n_batch, n_ubatch=self.n_batch,
                                n_threads=torch.get_num_threads(), verbose=False)

    def run(self, prompt: list[int], batch: int) -> tuple[float, float] | None:
        if batch != 1:
            return None
        self.llm.reset()  # no prompt-prefix reuse from the previous run
        stamps = []
        t0 = time.perf_counter()
        for _tok in self.llm.generate(prompt, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == NEW_TOKENS:
                break
        return stamps[0] - t0, (NEW_TOKENS - 1) / (stamps[-1] - stamps[0])


class Transformers:
    def __init__(self) -> None:
        from transformers import AutoModelForCausalLM

        path = smollm2_gguf()
        t = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        self.load_s = time.perf_counter() - t
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())

    def run(self, prompt: list[int], batch: int) -> tuple[float, float]:
        from transformers import LogitsProcessor, LogitsProcessorList

        stamps: list[float] = []

        class Stamp(LogitsProcessor):
            def __call__(self, input_ids, scores):
                stamps.append(time.perf_counter())
                return scores

        ids = torch.tensor([prompt] * batch)
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                                logits_processor=LogitsProcessorList([Stamp()]))
        return stamps[0] - t0, batch * (NEW_TOKENS - 1) / (stamps[-1] - stamps[0])


def _gguf_tensors():
    from lmlab.weights.gguf import open_gguf

    return open_gguf(smollm2_gguf()).tensors


def _weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every parameter and buffer once (a tied table once), the embedding table
    excepted when it is not also the output head (a lookup reads one row)."""
    head = getattr(model.output, "weight", None) if hasattr(model.output, "weight") else None
    skip = set()
    emb = model.tok_embeddings
    if getattr(emb, "weight", None) is not None and emb.weight is not head:
        skip.add(id(emb.weight))
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen or id(t) in skip or t.dtype == torch.float64:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def make_engine(name: str):
    if name in LMLAB:
        return Lmlab(*LMLAB[name])
    return LlamaCpp(*LLAMACPP[name]) if name in LLAMACPP else Transformers()


# ---- resident memory, in a fresh process per engine

def fresh_probe(name: str, prompt: list[int]) -> None:
    """Run in a fresh process: print the load time (after the imports, so one-time costs inside the load
    count), RSS after the imports, after loading + generating at batch 1, and the peak (MB), then the
    speeds (prefill tokens/s, decode tokens/s at batch 1 and batch 8) and the bytes read per token."""
    if name in LLAMACPP:
        import llama_cpp  # noqa: F401
    base = _rss()
    engine = make_engine(name)
    prefill, b1 = engine.run(prompt, 1)
    out = {"load_s": engine.load_s, "base_mb": base["VmRSS"], "rss_mb": _rss()["VmRSS"], "peak_mb": _rss()["VmHWM"],
           "prefill": PROMPT_TOKENS / prefill, "b1": b1, "weight_bytes": engine.weight_bytes}
    b8 = engine.run(prompt, 8)
    if b8 is not None:
        out["b8"] = b8[1]
    print(json.dumps(out))


def _rss() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def fresh_process(name: str, prompt: list[int]) -> dict[str, float] | None:
    """The probe's measurements, or None where its process was killed by a signal (a crash inside the engine)."""
    out = subprocess.run([sys.executable, __file__, "--probe", name, "--prompt-ids", json.dumps(prompt)],
                         capture_output=True, text=True)
    if out.returncode < 0:
        print(f"{name}: its process died of signal {out.returncode} ({out.stderr.strip()[-200:]})", flush=True)
        return None
    if out.returncode:
        raise RuntimeError(f"{name} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- quality of the fast path against the fp32-dequantized file

def quality(ppl_tokens: int) -> list[str]:
    from lmlab.evaluation.evaluate import sliding_window_perplexity

    ref = load_model(SPEC)  # dequantized to fp32, plain forward
    fast = load_model(SPEC, quantize="auto")  # the default settings
    tok = ref.tokenizer
    ids = tok.encode((data_dir() / "wikitext-2" / "test.txt").read_text())[:ppl_tokens]
    ppl = {name: sliding_window_perplexity(m.model, ids, 512, 512).ppl for name, m in (("fp32", ref), ("lmlab", fast))}
    lines = [f"WikiText-2 test, first {len(ids):,} tokens, windows of 512: perplexity fp32-dequantized "
             f"{ppl['fp32']:.3f}, lmlab default {ppl['lmlab']:.3f} ({100 * (ppl['lmlab'] / ppl['fp32'] - 1):+.2f}%; "
             "target within 1%)"]
    cfg = GenerationConfig(32, SamplingConfig(temperature=0))
    equal = 0
    for text in QUALITY_PROMPTS:
        prompt = encode_prompt(tok, text, chat=False)
        want, got = generate_ids(ref.model, [prompt], cfg)[0], generate_ids(fast.model, [prompt], cfg)[0]
        if want == got:
            equal += 1
            continue
        i = next(j for j, (a, b) in enumerate(zip(want, got)) if a != b)
        lines.append(f"greedy {text!r}: first divergence at token {i}: fp32 {tok.decode(want[i:i + 6])!r} vs "
                     f"lmlab {tok.decode(got[i:i + 6])!r} (common prefix {tok.decode(want[:i])!r})")
    lines.insert(1, f"greedy continuations, 32 tokens: {equal} of {len(QUALITY_PROMPTS)} prompts equal to fp32")
    return lines


# ---- the run

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--all", action="store_true", help="also lmlab bf16 and transformers fp32")
    ap.add_argument("--quality", action="store_true", help="perplexity and greedy equality vs fp32")
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--record", action="store_true", help="write the tables into benchmarks/RESULTS.md")
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    ap.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        return fresh_probe(args.probe, json.loads(args.prompt_ids))
    names = ["lmlab", "lmlab int8", "llama.cpp"] + (["lmlab bf16", "transformers"] if args.all else [])
    prompt = make_prompt(load_tokenizer(smollm2_gguf()))  # the engines load in their own processes
    results: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    bandwidth, memory, weight_bytes, crashed = [], {}, {}, []
    for _ in range(args.rounds):
        bandwidth.append(copy_bandwidth())
        queue = list(names)
        while queue:
            name = queue.pop(0)
            run = fresh_process(name, prompt)
            if run is None:
                if name != "llama.cpp":
                    raise RuntimeError(f"{name} crashed")
                # llama.cpp's defaults crashed: its working variants take their place for the rest of the run
                crashed.append(name)
                names.remove(name)
                del results[name]
                names += LLAMACPP_FALLBACKS
                results.update({n: {} for n in LLAMACPP_FALLBACKS})
                queue += LLAMACPP_FALLBACKS
                continue
            memory[name] = run
            weight_bytes[name] = run["weight_bytes"]
            for key in ("load_s", "prefill", "b1", "b8"):
                if key in run:
                    results[name].setdefault(key, []).append(run[key])
    bw = statistics.median(bandwidth)
    report = _report(weight_bytes, results, memory, bw, args, crashed)
    if args.quality:
        report += "\n" + "\n".join(f"- {line}" for line in quality(args.ppl_tokens)) + "\n"
    print(report)
    if args.record:
        from train_throughput import write_section  # the sibling script's RESULTS.md section writer

        write_section(report, HEADING)


def _report(weight_bytes: dict[str, int], results, memory, bw: float, args, crashed: list[str]) -> str:
    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in results.items()}
    lines = [f"Device: cpu ({cpu_name()}, {torch.get_num_threads()} threads, native bf16: "
             f"{'yes' if cpu_has_bf16() else 'no (AVX2: lmlab computes in fp32, its kernels take bf16)'}, load "
             f"average {os.getloadavg()[0]:.1f} at the end); torch {torch.__version__}; SmolLM2-135M-Instruct Q4_1 "
             f"GGUF, {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} greedy tokens; medians of {args.rounds} interleaved "
             f"rounds; copy bandwidth {bw / 1e9:.1f} GB/s (read + write); command: `python benchmarks/generate.py"
             f" --rounds {args.rounds}{' --quality' if args.quality else ''}`", "",
             "| engine | prefill tok/s | decode tok/s, batch 1 | decode tok/s, batch 8 (total) | load s | "
             "resident MB (peak) | weights MB read per token | bandwidth used |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in med.items():
        mem = memory.get(name)
        mem_s = f"{mem['rss_mb'] - mem['base_mb']:.0f} ({mem['peak_mb'] - mem['base_mb']:.0f})" if mem else "-"
        wb = weight_bytes[name]
        lines.append(f"| {name} | {r['prefill']:,.0f} | {r['b1']:.1f} | {r['b8']:.1f} | {r['load_s']:.2f} | {mem_s} | "
                     f"{wb / 1e6:.0f} | {100 * wb * r['b1'] / bw:.0f}% |" if "b8" in r else
                     f"| {name} | {r['prefill']:,.0f} | {r['b1']:.1f} | - | {r['load_s']:.2f} | {mem_s} | "
                     f"{wb / 1e6:.0f} | {100 * wb * r['b1'] / bw:.0f}% |")
    cpps, notes = [n for n in med if n in LLAMACPP], []
    if crashed:
        notes.append(f"{', '.join(crashed)} with its default settings died of a segmentation fault on the "
                     f"{PROMPT_TOKENS}-token prompt (its AMX buffer type; ggml-org/llama.cpp#20824): the variants "
                     f"{', '.join(cpps)} ran instead, and each ratio below is against the best of them")
    if cpps:  # the best llama.cpp value of each column
        ours = med["lmlab"]
        cpp = {"b1": max(med[n]["b1"] for n in cpps), "prefill": max(med[n]["prefill"] for n in cpps),
               "load_s": min(med[n]["load_s"] for n in cpps)}
        resident = {n: memory[n]["rss_mb"] - memory[n]["base_mb"] for n in ["lmlab", *cpps]}
        mem_ratio = resident["lmlab"] / min(resident[n] for n in cpps)
        notes.append(f"lmlab (default settings) / llama.cpp: batch-1 decode {ours['b1'] / cpp['b1']:.2f}x "
                     f"(target >= 1.0x), batch-8 total / llama.cpp batch 1 {ours['b8'] / cpp['b1']:.2f}x (target >= "
                     f"4x), prefill {ours['prefill'] / cpp['prefill']:.2f}x (target >= 3x), load {ours['load_s']:.2f} "
                     f"s vs {cpp['load_s']:.2f} s (target <= 0.5 s), resident memory {mem_ratio:.2f}x (target <= 1.5x)")
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
