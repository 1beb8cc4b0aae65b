"""Training throughput: lmlab (its own `fit` loop) vs transformers' LlamaForCausalLM, same shape.

Shape: llama2.c stories15M (dim 288, 6 layers, 6 heads, hidden 768, vocab 32000, context 256, batch 8).
Both train with torch's fused AdamW, gradient clipping at 1.0, fp32 or bf16 autocast, on the same
random tokens. MFU uses one FLOP count for both (6N + attention, PaLM appendix B) against the matmul
peak measured in this same run. Measurements alternate between the two in rounds and keep each
one's best round, so a noisy neighbour on a shared machine hurts both alike.

    python benchmarks/train_throughput.py                # CPU, fp32 and bf16
    python benchmarks/train_throughput.py --device cuda --batch 32
Writes the table under "## Training throughput" in benchmarks/RESULTS.md (other sections untouched).
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

import torch

from lmlab.model.config import get_preset
from lmlab.model.transformer import Transformer
from lmlab.precision import Precision, cpu_name, device_name, measure_matmul_peak, resolve_device
from lmlab.train.loop import FitConfig, fit
from lmlab.train.losses import lm_loss
from lmlab.train.optim import build_optimizer
from lmlab.train.schedule import Schedule
from lmlab.train.state import Progress

RESULTS = Path(__file__).parent / "RESULTS.md"
HEADING = "## Training throughput"


def lmlab_model(device) -> Transformer:
    torch.manual_seed(0)
    return Transformer(get_preset("llama2c-stories15m", dropout=0.0)).to(device)


def hf_model(device):
    from transformers import LlamaConfig, LlamaForCausalLM

    c = get_preset("llama2c-stories15m")
    cfg = LlamaConfig(hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
                      num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, vocab_size=c.vocab_size,
                      max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, tie_word_embeddings=True,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device)


def _timed_fit(model, opt, batches, precision, steps: int, lr: float) -> float:
    """Seconds for `steps` optimizer steps of lmlab's real training loop, after one warm-up step."""
    cfg = FitConfig(max_steps=1, grad_clip=1.0, log_every=10**9, progress_bar=False)
    data = lambda step, micro=0: batches[step % len(batches)]  # noqa: E731
    fit(model, lm_loss, data, opt, Schedule(lr, 0, 1, kind="constant"), cfg, precision)  # warm-up
    cfg.max_steps = 1 + steps
    precision.synchronize()
    t0 = time.perf_counter()
    fit(model, lm_loss, data, opt, Schedule(lr, 0, 1, kind="constant"), cfg, precision, progress=Progress(step=1))
    precision.synchronize()
    return time.perf_counter() - t0


def _timed_hf_loop(model, opt, params, batches, precision, steps: int) -> float:
    """Seconds for `steps` steps of the standard transformers loop (labels shifted inside the model), after one
    warm-up step; clipping `params` at 1.0."""
    def step(batch):
        with precision.autocast():
            loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    step(batches[0])  # warm-up
    precision.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    precision.synchronize()
    return time.perf_counter() - t0


def time_lmlab(model, batches, precision, steps: int) -> float:
    """Seconds for `steps` optimizer steps of lmlab's real training loop."""
    return _timed_fit(model, build_optimizer(model, impl="torch-fused", lr=1e-4), batches, precision, steps, 1e-4)


def time_hf(model, batches, precision, steps: int) -> float:
    """Seconds for `steps` steps of the standard transformers loop (labels shifted inside the model)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    return _timed_hf_loop(model, opt, list(model.parameters()), batches, precision, steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    ap.add_argument("--lora", action="store_true", help="LoRA r8 on q,v: lmlab vs transformers+peft (see lora_main)")
    ap.add_argument("--model", default="stories15m", choices=["stories15m", "smollm2-135m"],
                    help="smollm2-135m: full fine-tuning, LoRA q/v and LoRA on every linear (see finetune_main)")
    ap.add_argument("--context", type=int, default=128, help="tokens per sequence (--model smollm2-135m)")
    ap.add_argument("--compile", action="store_true",
                    help="--model smollm2-135m: also time both models under torch.compile (rows marked compiled)")
    args = ap.parse_args()
    if args.model == "smollm2-135m":
        return finetune_main(args)
    if args.lora:
        return lora_main(args)
    device = resolve_device(args.device)
    c = get_preset("llama2c-stories15m")
    T = c.max_seq_len
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": x[:, :-1].to(device), "labels": x[:, 1:].to(device)}
               for x in (torch.randint(0, c.vocab_size, (args.batch, T + 1), generator=g) for _ in range(4))]
    flops_tok = lmlab_model(device).flops_per_token(T)
    tokens = args.steps * args.batch * T
    rows = []
    for dtype in args.dtypes.split(","):
        precision = Precision(device, dtype)
        peak = measure_matmul_peak(device.type, dtype, 2048 if device.type == "cuda" else 1024, 1.0)
        models = {"lmlab": lmlab_model(device), "transformers": hf_model(device)}
        best = {name: float("inf") for name in models}
        for _ in range(args.rounds):
            best["lmlab"] = min(best["lmlab"], time_lmlab(models["lmlab"], batches, precision, args.steps))
            best["transformers"] = min(best["transformers"], time_hf(models["transformers"], batches, precision, args.steps))
        tps = {name: tokens / s for name, s in best.items()}
        for name in models:
            rows.append((dtype, name, tps[name], flops_tok * tps[name] / peak, peak))
        print(f"{dtype}: lmlab {tps['lmlab']:,.0f} tok/s, transformers {tps['transformers']:,.0f} tok/s, "
              f"ratio {tps['lmlab'] / tps['transformers']:.2f}x (peak {peak / 1e9:,.0f} GFLOP/s)")
    table = _table(rows, device, args)
    print(table)
    if not args.no_write:
        write_section(table)


def _table(rows, device, args) -> str:
    where = device_name(device) if device.type == "cuda" else f"{cpu_name()}, {torch.get_num_threads()} threads"
    load = ", load average %.1f at the end (a shared machine: compare rows of one table only)" % os.getloadavg()[0]
    lines = [f"Device: {device.type} ({where}{load}); torch {torch.__version__}; stories15M shape, batch {args.batch} x "
             f"context 256; best of {args.rounds} rounds of {args.steps} steps; command: "
             f"`python benchmarks/train_throughput.py --device {args.device} --batch {args.batch}`", "",
             "| dtype | implementation | tokens/s | MFU | matmul peak (GFLOP/s) | lmlab / transformers |",
             "|---|---|---:|---:|---:|---:|"]
    by = {(d, n): t for d, n, t, _, _ in rows}
    for d, n, t, mfu, peak in rows:
        ratio = f"{t / by[(d, 'transformers')]:.2f}x" if n == "lmlab" else ""
        lines.append(f"| {d} | {n} | {t:,.0f} | {100 * mfu:.1f}% | {peak / 1e9:,.0f} | {ratio} |")
    return "\n".join(lines) + "\n"


def write_section(table: str, heading: str = HEADING) -> None:
    """Replace (or append) this benchmark's subsection for the device kind, leaving the rest alone."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    kind = table.split(";")[0].removeprefix("Device: ").split(" ")[0]
    sub = f"### {kind}"
    section = re.search(rf"^{re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    body = section.group(1) if section else ""
    parts = re.split(r"(?=^### )", body, flags=re.M)
    parts = [p for p in parts if p.strip() and not p.startswith(sub + "\n")]
    new_body = "\n" + "".join(p if p.endswith("\n\n") else p.rstrip("\n") + "\n\n" for p in parts if p.startswith("###"))
    new_body += f"{sub}\n\n{table}\n"
    new = f"{heading}\n{new_body}"
    text = text[: section.start()] + new + text[section.end():] if section else text.rstrip("\n") + "\n\n" + new
    from lmlab.fileio import atomic_write_text

    atomic_write_text(RESULTS, text)


# ----------------------------------------------------------------------------------------------------
# LoRA: lmlab's LoRALinear on wq, wv vs peft's on q_proj, v_proj (added by the classification work)

LORA_HEADING = "## LoRA training throughput"


def lora_models(device):
    """The same stories15M shape with rank-8 adapters (alpha 16) on the query and value projections."""
    from peft import LoraConfig, get_peft_model

    from lmlab.adapters.lora import LoRAConfig, apply_lora

    ours = apply_lora(lmlab_model(device), LoRAConfig(rank=8, alpha=16, target_modules=["wq", "wv"]))
    theirs = get_peft_model(hf_model(device), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                         target_modules=["q_proj", "v_proj"]))
    return {"lmlab": ours, "transformers+peft": theirs}


def time_lora(name: str, model, batches, precision, steps: int) -> float:
    """Seconds for `steps` steps; lmlab through `fit`, peft through the standard loop (trainable params only)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    if name == "lmlab":
        return _timed_fit(model, opt, batches, precision, steps, 1e-4)
    return _timed_hf_loop(model, opt, params, batches, precision, steps)


def lora_main(args) -> None:
    """`--lora`: tokens/s of LoRA training, lmlab vs transformers+peft, per dtype (bf16 is the target)."""
    device = resolve_device(args.device)
    T = get_preset("llama2c-stories15m").max_seq_len
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": x[:, :-1].to(device), "labels": x[:, 1:].to(device)}
               for x in (torch.randint(0, 32000, (args.batch, T + 1), generator=g) for _ in range(4))]
    tokens = args.steps * args.batch * T
    lines = [f"Device: {device.type} ({device_name(device)}, {torch.get_num_threads()} threads); torch {torch.__version__}; "
             f"stories15M shape, LoRA r 8 alpha 16 on q,v, batch {args.batch} x context {T}; best of {args.rounds} "
             f"rounds of {args.steps} steps; command: `python benchmarks/train_throughput.py --lora --dtypes {args.dtypes}`",
             "", "| dtype | implementation | tokens/s | lmlab / peft |", "|---|---|---:|---:|"]
    for dtype in args.dtypes.split(","):
        precision = Precision(device, dtype)
        models = lora_models(device)
        best = {name: float("inf") for name in models}
        for _ in range(args.rounds):  # alternate, so a noisy neighbour hurts both alike
            for name, model in models.items():
                best[name] = min(best[name], time_lora(name, model, batches, precision, args.steps))
        tps = {name: tokens / s for name, s in best.items()}
        ratio = tps["lmlab"] / tps["transformers+peft"]
        print(f"{dtype}: lmlab {tps['lmlab']:,.0f} tok/s, peft {tps['transformers+peft']:,.0f} tok/s, {ratio:.2f}x")
        lines += [f"| {dtype} | lmlab | {tps['lmlab']:,.0f} | {ratio:.2f}x |",
                  f"| {dtype} | transformers+peft | {tps['transformers+peft']:,.0f} | |"]
    table = "\n".join(lines) + "\n"
    print(table)
    if not args.no_write:
        write_section(table, LORA_HEADING)


# ----------------------------------------------------------------------------------------------------
# SmolLM2-135M: full fine-tuning vs LoRA (q/v and every linear), lmlab vs transformers+peft (issue 15)

FINETUNE_HEADING = "## Fine-tuning throughput (SmolLM2-135M)"
LORA_TARGETS = {"lora-qv": (["wq", "wv"], ["q_proj", "v_proj"]),
                "lora-all": (["wq", "wk", "wv", "wo", "w1", "w2", "w3"],
                             ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])}


def smollm2_models(mode: str, device, dtype: str):
    """(lmlab model, transformers model) of SmolLM2-135M's shape (random weights: speed does not depend on
    them), both full or both with rank-16 adapters (alpha 32, no dropout, as the recipes) on `mode`'s targets."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmlab.adapters.lora import LoRAConfig, apply_lora, cast_frozen_weights

    c = get_preset("smollm2-135m", dropout=0.0)
    torch.manual_seed(0)
    ours = Transformer(c).to(device)
    cfg = LlamaConfig(hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
                      num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, vocab_size=c.vocab_size,
                      max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
                      tie_word_embeddings=True, attn_implementation="sdpa")
    theirs = LlamaForCausalLM(cfg).to(device)
    if mode == "full":
        return ours, theirs
    from peft import LoraConfig, get_peft_model

    targets, hf_targets = LORA_TARGETS[mode]
    apply_lora(ours, LoRAConfig(rank=16, alpha=32, target_modules=targets))
    cast_frozen_weights(ours, Precision(device, dtype).dtype)  # frozen weights kept in the matmul dtype
    theirs = get_peft_model(theirs, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=hf_targets))
    return ours, theirs


def time_steps(impl: str, model, batches, precision, steps: int) -> float:
    """Seconds for `steps` optimizer steps: lmlab through its own `fit`, transformers(+peft) through the
    standard loop; both AdamW (fused) over the trainable parameters only, clipping at 1.0."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    if impl == "lmlab":
        return _timed_fit(model, opt, batches, precision, steps, 1e-5)
    return _timed_hf_loop(model, opt, params, batches, precision, steps)


def finetune_main(args) -> None:
    """Tokens/s of full fine-tuning, LoRA q/v and LoRA on every linear, lmlab vs transformers+peft, per dtype.
    Every round times all six once (interleaved: a noisy neighbour hurts all alike); each keeps its best round.
    Targets (issue 15): LoRA q/v >= 1.3x lmlab's full step and >= 1.5x transformers+peft."""
    device = resolve_device(args.device)
    vocab, T = get_preset("smollm2-135m").vocab_size, args.context
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": x[:, :-1].to(device), "labels": x[:, 1:].to(device)}
               for x in (torch.randint(0, vocab, (args.batch, T + 1), generator=g) for _ in range(4))]
    tokens = args.steps * args.batch * T
    modes = ["full", "lora-qv", "lora-all"]
    if args.compile:  # the same models (the same parameters) behind torch.compile's wrapper
        modes += [f"{m}, compiled" for m in modes]
    rows = {}
    for dtype in args.dtypes.split(","):
        precision = Precision(device, dtype)
        models = {(mode, impl): m for mode in modes if not mode.endswith("compiled")
                  for impl, m in zip(("lmlab", "transformers"), smollm2_models(mode, device, dtype))}
        if args.compile:
            models |= {(f"{mode}, compiled", impl): torch.compile(m) for (mode, impl), m in list(models.items())}
            for key, model in models.items():  # compile outside the timed rounds
                if key[0].endswith("compiled"):
                    t = time.perf_counter()
                    time_steps(key[1], model, batches, precision, 1)
                    print(f"{dtype} {key[0]} {key[1]}: compiled in {time.perf_counter() - t:.0f} s", flush=True)
        best = dict.fromkeys(models, float("inf"))
        for _ in range(args.rounds):
            for key, model in models.items():
                best[key] = min(best[key], time_steps(key[1], model, batches, precision, args.steps))
        for key, seconds in best.items():
            rows[(dtype, *key)] = tokens / seconds
        del models
        r = {k[1:]: v for k, v in rows.items() if k[0] == dtype}
        print(f"{dtype}: " + ", ".join(f"{m} {i} {r[(m, i)]:,.0f}" for m in modes for i in ("lmlab", "transformers"))
              + " tok/s")
    table = _finetune_table(rows, modes, device, args)
    print(table)
    if not args.no_write:
        write_section(table, FINETUNE_HEADING)


def _finetune_table(rows: dict, modes: list[str], device, args) -> str:
    load = os.getloadavg()[0]
    lines = [f"Device: {device.type} ({device_name(device)}, {torch.get_num_threads()} threads, load average {load:.1f} "
             f"at the end); torch {torch.__version__}; SmolLM2-135M shape, batch {args.batch} x context "
             f"{args.context}, AdamW over the trainable parameters, LoRA r 16 alpha 32 no dropout; best of "
             f"{args.rounds} interleaved rounds of {args.steps} steps; command: `python benchmarks/"
             f"train_throughput.py --model smollm2-135m --dtypes {args.dtypes}"
             f"{' --compile' if args.compile else ''} --rounds {args.rounds} --steps {args.steps}`", "",
             "| dtype | mode | lmlab tokens/s | transformers(+peft) tokens/s | lmlab / transformers | "
             "lmlab / lmlab full |", "|---|---|---:|---:|---:|---:|"]
    for dtype in args.dtypes.split(","):
        for mode in modes:
            full = rows[(dtype, "full, compiled" if mode.endswith("compiled") else "full", "lmlab")]
            ours, theirs = rows[(dtype, mode, "lmlab")], rows[(dtype, mode, "transformers")]
            lines.append(f"| {dtype} | {mode} | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.2f}x | {ours / full:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
