"""DPO training speed and memory: lmlab's `dpo_loss` through its own loop vs TRL's DPOTrainer, and lmlab LoRA
DPO vs lmlab LoRA SFT on the same batch (what the reference costs in memory).

Same model (SmolLM2-135M-Instruct, converted once to a Hugging Face folder both load, fp32 weights, bf16
autocast), same pairs (HH-RLHF harmless test pairs that fit the length budget untruncated, so both see the
same tokens; TRL's chat rendering adds one "\\n" after each response's <|im_end|>), the same batch (B pairs =
2B sequences per step, no accumulation), the same LoRA (r 16, alpha 32, no dropout, every linear layer),
reference = the adapters disabled in both, AdamW, no gradient checkpointing. The SFT row trains the
same 2B sequences with the response-only LM loss (lm_loss).

Each engine runs in its own process (peak RSS is per process); engines alternate in rounds and each step's
tokens/s is kept, warm-up steps dropped; the table reports medians. On a shared machine only ratios within
one run mean anything.

    python benchmarks/dpo.py                     # 2 rounds x 6 timed steps, batch 4 pairs
    python benchmarks/dpo.py --rounds 3 --steps 8 --threads 2
Writes the table under "## DPO training" in benchmarks/RESULTS.md (other sections untouched).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

HEADING = "## DPO training"
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ENGINES = ("lmlab-dpo", "trl-dpo", "lmlab-sft")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(folder: Path, n_pairs: int, max_len: int, prompt_len: int) -> tuple[Path, Path]:
    """The HF folder of SmolLM2 (from the embedded GGUF) and a JSONL of pairs that fit untruncated."""
    from lmlab.data.preference import PreferenceFormat, encode_pairs, read_pairs, write_pairs
    from lmlab.errors import DataError
    from lmlab.paths import data_dir
    from lmlab.weights.hf import save_hf
    from lmlab.weights.loading import load_model

    loaded = load_model("smollm2-135m-instruct")
    hf = save_hf(loaded.model, folder / "hf", tokenizer=loaded.tokenizer)
    fmt = PreferenceFormat(loaded.tokenizer, max_len=max_len, max_prompt_len=0)
    pairs = read_pairs([data_dir() / "hh-rlhf-harmless-base" / "test.jsonl"]).pairs
    fits = []
    for p in pairs:
        try:
            e = encode_pairs([p], fmt).pairs
        except DataError:  # the prompt alone is longer than max_len
            continue
        if e and len(e[0].prompt) <= prompt_len and e[0].length < max_len:  # TRL's "\n" still fits
            fits.append(p)
        if len(fits) == n_pairs:
            break
    return hf, write_pairs(fits, folder / "pairs.jsonl")


def lmlab_worker(engine: str, hf: str, pairs_file: str, args: argparse.Namespace) -> dict:
    """Steps of lmlab's loop (lmlab.train.loop.fit) with dpo_loss or lm_loss; per-step tokens and times."""
    from lmlab.adapters.lora import apply_lora
    from lmlab.data.batch import IGNORE_INDEX
    from lmlab.data.preference import PairBatches, PreferenceFormat, encode_pairs, read_pairs
    from lmlab.precision import Precision
    from lmlab.schema.sections import LoRAConfig
    from lmlab.train.logger import MetricsLogger
    from lmlab.train.loop import FitConfig, fit
    from lmlab.train.losses import lm_loss
    from lmlab.train.preference import DPOSettings, dpo_loss, lora_reference
    from lmlab.train.schedule import Schedule
    from lmlab.weights.loading import load_model

    loaded = load_model(hf)
    model, tok = loaded.model, loaded.tokenizer
    after_load = rss_mb()
    data = encode_pairs(read_pairs([pairs_file]).pairs, PreferenceFormat(tok, max_len=args.max_len, max_prompt_len=0))
    apply_lora(model, LoRAConfig(rank=16, alpha=32, dropout=0.0, target_modules=["wq", "wk", "wv", "wo", "w1", "w2", "w3"]))
    pairs = PairBatches(data, args.batch, 1, 0, tok.pad_id)
    if engine == "lmlab-dpo":
        objective, source = partial(dpo_loss, settings=DPOSettings(beta=0.1), reference=lora_reference(model)), pairs
    else:
        def source(step: int, micro: int = 0) -> dict:
            b = pairs(step, micro)  # the same 2B rows, response-only next-token loss
            ids, pos = b["input_ids"], torch.arange(b["input_ids"].shape[1] - 1)[None]
            keep = (pos >= b["prompt_lens"][:, None] - 1) & (pos < b["lengths"][:, None] - 1)
            return {"input_ids": ids[:, :-1], "labels": ids[:, 1:].masked_fill(~keep, IGNORE_INDEX)}
        objective = lm_loss
    tokens = [int(pairs(s)["lengths"].sum()) for s in range(args.warmup + args.steps)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    log = Path(tempfile.mkdtemp()) / "metrics.jsonl"
    cfg = FitConfig(max_steps=args.warmup + args.steps, grad_clip=1.0, log_every=1, progress_bar=False)
    logger = MetricsLogger(log)
    fit(model, objective, source, opt, Schedule(1e-5, 0, 1, kind="constant"), cfg, Precision(torch.device("cpu"), "bf16"),
        logger=logger)
    logger.close()
    elapsed = [json.loads(line)["elapsed_s"] for line in log.read_text().splitlines()]
    times = [b - a for a, b in zip([0.0] + elapsed, elapsed)]
    return {"tokens": tokens, "times": times, "peak_rss_mb": rss_mb(), "rss_after_load_mb": after_load}


def trl_worker(hf: str, pairs_file: str, args: argparse.Namespace) -> dict:
    """Steps of TRL's DPOTrainer with a peft LoRA (reference = adapters disabled); per-step tokens and times."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(hf)
    after_load = rss_mb()
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in map(json.loads, Path(pairs_file).read_text().splitlines())]
    stamps: list[tuple[float, int]] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if not stamps:
                stamps.append((time.perf_counter(), trainer._total_train_tokens))

        def on_step_end(self, *a, **k):
            stamps.append((time.perf_counter(), trainer._total_train_tokens))

    cfg = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
                    max_steps=args.warmup + args.steps, learning_rate=1e-5, bf16=True, gradient_checkpointing=False,
                    logging_steps=10**6, report_to="none", use_cpu=True, max_length=None, save_strategy="no", beta=0.1,
                    seed=0, dataloader_num_workers=0, disable_tqdm=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=HF_TARGETS, task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=lora, callbacks=[Timer()])
    trainer.train()
    times = [b[0] - a[0] for a, b in itertools.pairwise(stamps)]
    tokens = [b[1] - a[1] for a, b in itertools.pairwise(stamps)]
    return {"tokens": tokens, "times": times, "peak_rss_mb": rss_mb(), "rss_after_load_mb": after_load,
            "mixed_precision": str(trainer.accelerator.mixed_precision)}


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.worker == "trl-dpo":
        out = trl_worker(args.hf, args.pairs, args)
    else:
        out = lmlab_worker(args.worker, args.hf, args.pairs, args)
    print("RESULT " + json.dumps(out), flush=True)


def run_engine(engine: str, hf: Path, pairs: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--hf", str(hf), "--pairs", str(pairs),
           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--max-len", str(args.max_len)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "TQDM_DISABLE": "1",
           "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{engine} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1].removeprefix("RESULT "))
    k = args.warmup
    out["tok_s"] = [t / s for t, s in zip(out["tokens"][k:], out["times"][k:])]
    print(f"{engine}: median {statistics.median(out['tok_s']):,.0f} tokens/s over {len(out['tok_s'])} steps, "
          f"peak RSS {out['peak_rss_mb']:,.0f} MB", flush=True)
    return out


def table(results: dict[str, list[dict]], args: argparse.Namespace) -> str:
    med = {e: statistics.median([x for r in rs for x in r["tok_s"]]) for e, rs in results.items()}
    peak = {e: statistics.median([r["peak_rss_mb"] for r in rs]) for e, rs in results.items()}
    extra = {e: statistics.median([r["peak_rss_mb"] - r["rss_after_load_mb"] for r in rs]) for e, rs in results.items()}
    import trl

    from lmlab.precision import cpu_name  # lmlab is imported in the functions here, as the engines do

    where = f"{cpu_name()}, {args.threads} thread(s)"
    load = os.getloadavg()[0]
    lines = [
        (f"Device: cpu ({where}, load average {load:.1f} at the end: a shared machine, compare rows of one table "
        f"only); torch {torch.__version__}, trl {trl.__version__}; SmolLM2-135M-Instruct, {args.batch} pairs "
        f"({2 * args.batch} sequences, at most {args.max_len} tokens) per step, LoRA r 16 / alpha 32 on every linear "
        f"layer, bf16 autocast; medians over {args.rounds} rounds x {args.steps} timed steps; command: "
        f"`python benchmarks/dpo.py --rounds {args.rounds} --steps {args.steps} --batch {args.batch} "
        f"--threads {args.threads}`"), "",
        "| run | tokens/s | vs TRL DPO | peak RSS (MB) | over the loaded model (MB) | peak vs lmlab LoRA SFT |",
        "|---|---:|---:|---:|---:|---:|"]
    names = {"lmlab-dpo": "lmlab LoRA DPO (reference = adapters disabled)", "trl-dpo": "TRL DPOTrainer + peft LoRA",
             "lmlab-sft": "lmlab LoRA SFT, same sequences"}
    for e in ENGINES:
        vs = f"{med[e] / med['trl-dpo']:.2f}x" if e != "trl-dpo" else ""
        mem = f"{peak[e] / peak['lmlab-sft']:.2f}x" if e == "lmlab-dpo" else ""
        lines.append(f"| {names[e]} | {med[e]:,.0f} | {vs} | {peak[e]:,.0f} | {extra[e]:,.0f} | {mem} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4, help="pairs per step")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per round and engine")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-len", type=int, default=192)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--hf", help=argparse.SUPPRESS)
    ap.add_argument("--pairs", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        hf, pairs = prepare(Path(tmp), args.batch * (args.warmup + args.steps), args.max_len, args.prompt_len)
        results: dict[str, list[dict]] = {e: [] for e in ENGINES}
        for _ in range(args.rounds):
            for engine in ENGINES:
                results[engine].append(run_engine(engine, hf, pairs, args))
    text = table(results, args)
    print(text)
    if not args.no_write:
        sys.path.insert(0, str(Path(__file__).parent))
        from train_throughput import write_section

        write_section(text, HEADING)


if __name__ == "__main__":
    main()
