"""Time to load the SmolLM2-135M-Instruct Q4_1 GGUF into a ready model: lmlab vs transformers (and
llama-cpp-python when installed).

Each load runs in a fresh Python process (so one-time costs inside the load count), after the
library is imported; import time is reported separately. "Ready" means: weights dequantized into
the model, tokenizer built, one forward pass possible.

    python benchmarks/load_time.py [--repeats 3] [--dtype fp32|bf16] [--skip-transformers]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

LMLAB = """
import time, json
t0 = time.perf_counter()
import torch
from lmlab.weights.loading import load_model
t1 = time.perf_counter()
loaded = load_model("smollm2-135m-instruct", dtype={dtype!r})
t2 = time.perf_counter()
assert loaded.tokenizer is not None
print(json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1}}))
"""

TRANSFORMERS = """
import time, json
t0 = time.perf_counter()
import torch, transformers
from lmlab.paths import smollm2_gguf
p = smollm2_gguf()
t1 = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
tok = transformers.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1}))
"""

LLAMA_CPP = """
import time, json
t0 = time.perf_counter()
from llama_cpp import Llama
from lmlab.paths import smollm2_gguf
t1 = time.perf_counter()
llm = Llama(model_path=str(smollm2_gguf()), verbose=False)
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1}))
"""


def run(code: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(name: str, code: str, repeats: int) -> dict[str, float] | None:
    try:
        runs = [run(code) for _ in range(repeats)]
    except RuntimeError as err:
        print(f"{name:<18} skipped ({err})")
        return None
    loads = [r["load_s"] for r in runs]
    row = {"load_s": statistics.median(loads), "min_s": min(loads), "import_s": statistics.median(r["import_s"] for r in runs)}
    print(f"{name:<18} load {row['load_s']:6.2f} s (median of {repeats}, min {row['min_s']:.2f})   "
          f"import {row['import_s']:.2f} s")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    ours = measure(f"lmlab ({args.dtype})", LMLAB.format(dtype=args.dtype), args.repeats)
    others = {}
    if not args.skip_transformers:
        others["transformers"] = measure("transformers", TRANSFORMERS, 1)
    others["llama-cpp-python"] = measure("llama-cpp-python", LLAMA_CPP, args.repeats)
    for name, row in others.items():
        if ours and row:
            print(f"{name} / lmlab load time: {row['load_s'] / ours['load_s']:.2f}x")

if __name__ == "__main__":
    main()
