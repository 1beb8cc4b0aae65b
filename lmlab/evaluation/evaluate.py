"""Evaluation of language models: sliding-window perplexity, loss by position, checkpoints of a run,
and the long-context (attention-sink) comparison.

Sliding-window perplexity follows the Hugging Face guide "Perplexity of fixed-length models": windows
of `context` tokens start every `stride` tokens, and each window scores only the tokens no earlier
window scored, so every token after the first is scored exactly once, with at least
`context - stride` tokens of history (except near the start). stride = context gives disjoint chunks
(fast, pessimistic); smaller strides approach the true autoregressive perplexity. The mean is
token-weighted: the summed NLL divided by the number of scored tokens.

Loss by position (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks", Fig. 3)
scores windows longer than the trained context and averages the NLL at each position, which shows
where a model breaks down past its context: dense attention, window attention without sinks, or the
streaming KV cache with sinks.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.data.batch import IGNORE_INDEX, pad_id_of
from lmlab.data.corpus import read_documents
from lmlab.data.pretrain import prepare_data, token_eval_batches
from lmlab.errors import ConfigError, DataError
from lmlab.evaluation.plots import plot_lines, plot_loss_by_position
from lmlab.evaluation.sweep import markdown_table
from lmlab.fileio import atomic_write_text
from lmlab.generation.generate import GenerationConfig, generate, generate_ids
from lmlab.generation.sampling import SamplingConfig
from lmlab.model.kv_cache import KVCache
from lmlab.precision import DTYPES, Precision, resolve_device
from lmlab.schema.load import load_config
from lmlab.schema.pretrain import PretrainConfig
from lmlab.train.loop import evaluate
from lmlab.train.losses import lm_loss
from lmlab.weights.checkpoint import load_checkpoint
from lmlab.weights.loading import load_model


def logits_of(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of an lmlab Transformer or a transformers model (which returns `.logits`)."""
    out = model(tokens)
    return out.logits if hasattr(out, "logits") else out


# ----------------------------------------------------------------------------------------------------
# sliding-window perplexity


def window_plan(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) of each window: tokens [begin, end) are fed, tokens
    [first_target, end) are scored. Token 0 has no history and is never scored."""
    if context < 2:
        raise ConfigError(f"context={context}: expected at least 2 tokens")
    if not 1 <= stride <= context:
        raise ConfigError(f"stride={stride}: expected 1 <= stride <= context ({context})")
    if n_tokens < 2:
        raise DataError(f"{n_tokens} token(s): need at least 2 to score one")
    plan, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            plan.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return plan


@dataclass
class PerplexityResult:
    """Token-weighted mean NLL and its perplexity, with the settings and the time it took."""

    nll: float
    ppl: float
    n_tokens: int
    n_windows: int
    context: int
    stride: int
    seconds: float
    n_docs: int = 1
    """Documents scored (each on its own windows)."""

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / max(self.seconds, 1e-9)


def sliding_window_perplexity(
    model: Any, ids: Sequence[int] | torch.Tensor, context: int, stride: int | None = None,
    batch_size: int = 1, device: str | torch.device = "cpu", autocast: torch.dtype | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of token stream `ids` under `model` (see the module docstring for the method)."""
    return documents_perplexity(model, [ids], context, stride, batch_size, device, autocast, progress)


@torch.no_grad()
def documents_perplexity(
    model: Any, docs: Sequence[Sequence[int] | torch.Tensor], context: int, stride: int | None = None,
    batch_size: int = 1, device: str | torch.device = "cpu", autocast: torch.dtype | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Token-weighted perplexity of several documents, each scored on its own with sliding windows (no
    window spans two documents, so each starts fresh from its own first token, BOS where the tokenizer
    adds one). Documents of fewer than 2 tokens have nothing to score and are left out."""
    streams = [torch.as_tensor(d, dtype=torch.long).flatten() for d in docs]
    streams = [d for d in streams if len(d) >= 2]
    if not streams:
        raise DataError("no document has the 2 tokens needed to score one")
    stride = stride or context
    plan = [(k, b, e, f) for k, d in enumerate(streams) for b, e, f in window_plan(len(d), context, stride)]
    t0 = time.perf_counter()
    total, count = 0.0, 0
    groups = [plan[i:i + batch_size] for i in range(0, len(plan), batch_size)]
    bar = _bar(len(plan), progress)
    for group in groups:
        for same in _by_length(group):  # documents' last windows are shorter than the others
            tokens = torch.stack([streams[k][b:e] for k, b, e, _ in same]).to(device)
            labels = tokens[:, 1:].clone()
            for row, (_, b, _, first) in enumerate(same):
                labels[row, : first - b - 1] = IGNORE_INDEX
            with _autocast(device, autocast):
                logits = logits_of(model, tokens[:, :-1])  # windows hold >= 2 tokens
            total += F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                     reduction="sum").item()
            count += int((labels != IGNORE_INDEX).sum())
        bar.update(len(group))
    bar.close()
    nll = total / count
    return PerplexityResult(nll, math.exp(nll), count, len(plan), context, stride, time.perf_counter() - t0,
                            len(streams))


def _by_length(windows: list[tuple[int, int, int, int]]) -> list[list[tuple[int, int, int, int]]]:
    lengths = sorted({e - b for _, b, e, _ in windows}, reverse=True)
    return [[w for w in windows if w[2] - w[1] == n] for n in lengths]


def _autocast(device: str | torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _bar(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit="window", dynamic_ncols=True)


SEPARATORS = ("auto", "none", "line", "blank_line")
"""--separator values; any other string is a literal marker between documents (e.g. <|endoftext|>)."""
END_OF_TEXT = "<|endoftext|>"  # TinyStories' and GPT-2's document marker


def read_eval_documents(path: str | Path, field: str = "text", column: str = "text",
                        separator: str = "auto") -> list[str]:
    """The documents of an evaluation file. JSONL/JSON records (`field`) and CSV rows (`column`) are one
    document each. Plain text: `auto` splits at <|endoftext|> when the text has it (else one document),
    `none` keeps the file whole, `line` / `blank_line` split there, any other value is the marker."""
    docs, _ = read_documents(str(path), field=field, column=column,
                             separator=separator if separator in ("line", "blank_line") else "record")
    if Path(path).suffix.lower() in (".jsonl", ".json", ".csv") or separator in ("none", "line", "blank_line"):
        return docs
    marker = END_OF_TEXT if separator == "auto" else separator
    parts = [p.strip("\n") for d in docs for p in d.split(marker)]
    return [p for p in parts if p.strip()] or docs


def model_perplexity(
    spec: str, data: str | Path, *, context: int = 0, stride: int = 0, max_tokens: int = 0, batch_size: int = 1,
    field: str = "text", device: str = "cpu", dtype: str = "fp32", progress: bool = True, separator: str = "auto",
    quantize: str = "none",
) -> tuple[PerplexityResult, dict[str, Any]]:
    """Load any model lmlab can load (`lmlab.weights.loading.load_model`) and measure its perplexity on a file.

    context 0 = the model's trained context, capped at 1024 (CPU time grows with it); stride 0 = context/2.
    Each document (see `read_eval_documents`) is tokenized on its own, with BOS where the tokenizer adds
    one, and scored on its own windows; max_tokens caps the total. quantize: as `load_model`'s (the
    weights then compute in bf16 where the hardware has it).
    """

    loaded = load_model(spec, device=device, quantize=quantize)
    model, tok = loaded.model, loaded.require_tokenizer("put a tokenizer file beside it")
    model.eval()
    trained = _trained_context(model)
    if trained and context > trained:  # windows past the trained context score positions it never learned
        raise ConfigError(f"context={context} is longer than {spec}'s trained context of {trained} tokens")
    context = context or min(trained or 1024, 1024)
    stride = stride or max(1, context // 2)
    bos = bool(tok.add_bos and tok.bos_id is not None)
    docs, budget = [], max_tokens or math.inf
    for text in read_eval_documents(data, field, separator=separator):
        ids = tok.encode(text, bos=bos)[: budget if budget < math.inf else None]
        docs.append(ids)
        budget -= len(ids)
        if budget <= 0:
            break
    result = documents_perplexity(model, docs, context, stride, batch_size, device,
                                  None if dtype == "fp32" else DTYPES[dtype], progress)
    info = dict(model=str(spec), source=str(getattr(loaded, "source", spec)), data=str(data), dtype=dtype,
                device=device, trained_context=trained, tokenizer=type(tok).__name__, separator=separator,
                bos_per_document=bos, quantize=quantize)
    return result, info


def _trained_context(model: Any) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_seq_len", None) or getattr(cfg, "max_position_embeddings", None)


# ----------------------------------------------------------------------------------------------------
# loss by position (long context)

MODES = ("dense", "window", "streaming")


@contextlib.contextmanager
def _attention_window(model: Any, window: int | None):
    """Temporarily give the model a sliding attention window (no sinks): StreamingLLM's 'window
    attention' baseline, scored with a full forward. The model reads config.window on every call."""
    old = model.config.window
    model.config.window = window
    try:
        yield model
    finally:
        model.config.window = old


@torch.no_grad()
def _streaming_nll(model: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, T) NLL when tokens go through the KV cache as in generation: one prefill of what fits, then
    one token at a time. With sinks the cache evicts the oldest non-sink keys (StreamingLLM)."""

    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    cache = KVCache(model.config, x.shape[0], x.shape[1], device=x.device, dtype=dtype)
    first = min(x.shape[1], cache.capacity)
    out = [_nll(model(x[:, :first], cache=cache), y[:, :first])]
    for t in range(first, x.shape[1]):
        out.append(_nll(model(x[:, t:t + 1], cache=cache), y[:, t:t + 1]))
    return torch.cat(out, dim=1)


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # (B, T)


@torch.no_grad()
def loss_by_position(model: Any, windows: torch.Tensor, mode: str = "dense", batch_size: int = 4) -> torch.Tensor:
    """Mean NLL at each position of `windows` (N, L+1) -> (L,); entry i is the loss of predicting token
    i+1 from tokens 0..i. mode: dense (one forward, the model's own mask), window (sliding window of
    max_seq_len, no sinks), streaming (KV cache; evicts past sink_tokens + window when the model has sinks)."""
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r}: expected one of {MODES}")
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(windows.shape[1] - 1, dtype=torch.float64)
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size].to(device)
        x, y = w[:, :-1], w[:, 1:]
        if mode == "streaming":
            nll = _streaming_nll(model, x, y)
        else:
            ctx = _attention_window(model, model.config.max_seq_len) if mode == "window" else contextlib.nullcontext()
            with ctx:
                nll = _nll(model(x), y)
        total += nll.double().sum(0).cpu()
    return (total / len(windows)).float()


def long_windows(tokens: Sequence[int], length: int, n_windows: int) -> torch.Tensor:
    """Up to `n_windows` disjoint windows of `length` + 1 tokens from the start of a token stream."""
    n = min(n_windows, len(tokens) // (length + 1))
    if n < 1:
        raise DataError(f"{len(tokens)} tokens: too few for one window of {length + 1} tokens")
    t = torch.tensor(np.asarray(tokens[: n * (length + 1)], dtype=np.int64))  # a copy: shards are read-only
    return t.view(n, length + 1)


def split_ppl(curve: torch.Tensor, context: int) -> dict[str, float]:
    """Perplexity inside the trained context, past it, and over the whole window."""
    def ppl(part: torch.Tensor) -> float:
        return math.exp(float(part.mean())) if len(part) else float("nan")

    return {"ppl_inside": ppl(curve[:context]), "ppl_beyond": ppl(curve[context:]), "ppl_all": ppl(curve)}


# ----------------------------------------------------------------------------------------------------
# runs: checkpoints and validation data


def run_validation_tokens(run_dir: Path) -> tuple[Any, Any, Any]:
    """(config, tokenizer, validation TokenSplit) of a run, rebuilt from its config.yaml the way
    `lmlab run` builds them (the token cache makes this a lookup, not a re-tokenization)."""

    cfg = load_config(run_dir / "config.yaml", schema=PretrainConfig)
    tokenizer, _, val = prepare_data(cfg.data)
    return cfg, tokenizer, val


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """step_XXXXXXX folders in step order, then best/."""
    root = run_dir / "checkpoints"
    steps = sorted(p for p in root.glob("step_*") if (p / "model.safetensors").is_file())
    best = [root / "best"] if (root / "best" / "model.safetensors").is_file() else []
    return steps + best


def _checkpoint_step(folder: Path) -> int | None:
    meta = folder / "meta.json"
    if meta.is_file():
        return json.loads(meta.read_text()).get("step")
    return int(folder.name[5:]) if folder.name.startswith("step_") else None


def evaluate_run(run_dir: str | Path, device: str = "cpu", dtype: str = "fp32", max_batches: int = 0) -> tuple[Path, Path]:
    """Validation loss and perplexity of every checkpoint of a run -> eval/checkpoints.csv and .png."""
    run_dir = Path(run_dir)
    folders = checkpoint_dirs(run_dir)
    if not folders:
        raise DataError(f"{run_dir}: no checkpoints (expected checkpoints/step_XXXXXXX/ or checkpoints/best/)")
    cfg, tok, val = run_validation_tokens(run_dir)
    precision = Precision(resolve_device(device), dtype)
    rows = []
    for folder in folders:
        model = load_checkpoint(folder, device=precision.device)
        seq_len = cfg.data.seq_len or model.config.max_seq_len
        batches = token_eval_batches(val, seq_len, cfg.train.batch_size, cfg.data.sampling, pad_id=pad_id_of(tok),
                                     max_batches=max_batches or cfg.data.val_batches)
        loss = evaluate(model, lm_loss, batches, precision)["loss"]
        rows.append(dict(checkpoint=folder.name, step=_checkpoint_step(folder), val_loss=loss, val_ppl=math.exp(loss)))
    out = run_dir / "eval"
    csv_path = out / "checkpoints.csv"
    atomic_write_text(csv_path, _csv(rows))
    steps = [r for r in rows if r["checkpoint"] != "best" and r["step"] is not None]
    lines = {"val loss": ([r["step"] for r in steps], [r["val_loss"] for r in steps])}
    best = {f"best (step {r['step']})": r["step"] for r in rows if r["checkpoint"] == "best" and r["step"]}
    png = plot_lines(lines, out / "checkpoints.png", title=f"validation loss by checkpoint: {run_dir.name}",
                     xlabel="step", ylabel="validation loss (nats/token)", vlines=best, markers=True)
    return csv_path, png


def checkpoint_samples(run_dir: str | Path, prompts: Sequence[str], *, max_new_tokens: int = 60,
                       temperature: float = 0.8, top_k: int | None = 40, seed: int = 0,
                       device: str = "cpu") -> Path:
    """Seed 001's generate_from_checkpoints.py: every checkpoint of a run continues the same prompts with the
    same seed and sampling, side by side -> RUN_DIR/eval/samples.md (a row per prompt, a column per
    checkpoint; newlines shown as <br>), so what training changed reads across a row."""
    run_dir = Path(run_dir)
    folders = checkpoint_dirs(run_dir)
    if not folders:
        raise DataError(f"{run_dir}: no checkpoints (expected checkpoints/step_XXXXXXX/ or checkpoints/best/)")
    if not prompts:
        raise ConfigError("--samples: give at least one prompt (or a file of prompts, one per line)")
    gen = GenerationConfig(max_new_tokens, SamplingConfig(temperature=temperature, top_k=top_k), seed=seed)
    columns: dict[str, list[str]] = {}
    tokenizer = None
    for folder in folders:
        loaded = load_model(folder, device=device)
        if loaded.tokenizer is None and tokenizer is None:  # checkpoints written without one: the run's
            tokenizer = run_validation_tokens(run_dir)[1]
        tok = loaded.tokenizer or tokenizer
        step = _checkpoint_step(folder)
        label = f"step {step}" if folder.name.startswith("step_") else f"{folder.name} (step {step})"
        columns[label] = generate(loaded.model, tok, list(prompts), gen)
    rows = [{"prompt": p, **{k: v[i] for k, v in columns.items()}} for i, p in enumerate(prompts)]
    cells = [{k: str(v).replace("\n", "<br>") for k, v in r.items()} for r in rows]
    settings = (f"{max_new_tokens} tokens per sample, temperature {temperature}, top-k {top_k}, seed {seed}: "
                "each cell continues its row's prompt")
    out = run_dir / "eval" / "samples.md"
    atomic_write_text(out, f"# Samples by checkpoint: {run_dir.name}\n\n{settings}\n\n"
                           + markdown_table(cells, ["prompt", *columns]) + "\n")
    return out


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------
# the attention-sink experiment


@dataclass
class LongContextRow:
    """One (model, attention mode) line of the long-context table."""

    run: str
    mode: str
    sink_tokens: int
    context: int
    window_len: int
    ppl_inside: float
    ppl_beyond: float
    ppl_all: float


def long_context_eval(
    run_dirs: Sequence[str | Path], out_dir: str | Path, factor: int = 3, n_windows: int = 8,
    prompt: str = "The", gen_seed: int = 0, device: str = "cpu",
) -> list[Path]:
    """Score `factor` x the trained context for each run (dense and window attention without sinks,
    streaming cache with sinks), plot loss by position, and generate that far from `prompt`."""

    out_dir = Path(out_dir)
    curves, rows, samples, context = {}, [], [], 0
    for run_dir in map(Path, run_dirs):
        model, tok, context, val = _load_run_model(run_dir, device)
        windows = long_windows(val.tokens, factor * context, n_windows)
        modes = ("streaming", "dense") if model.config.sink_tokens else ("dense", "window")
        for mode in modes:
            curve = loss_by_position(model, windows, mode)
            curves[f"{run_dir.name} ({mode})"] = curve.tolist()
            rows.append(LongContextRow(run_dir.name, mode, model.config.sink_tokens, context, windows.shape[1] - 1,
                                       **split_ppl(curve, context)))
        samples.append(_long_sample(model, tok, run_dir.name, prompt, factor * context, context, gen_seed))
    paths = [plot_loss_by_position(curves, out_dir / "loss_by_position.png", context, smooth=16,
                                   title=f"loss by position at {factor}x the trained context")]
    table = [asdict(r) for r in rows]
    paths.append(out_dir / "long_context.csv")
    atomic_write_text(paths[-1], _csv(table))

    paths.append(out_dir / "long_context.md")
    atomic_write_text(paths[-1], markdown_table(table, list(table[0])) + "\n")
    paths.append(out_dir / "long_context_samples.txt")
    atomic_write_text(paths[-1], "\n".join(samples))
    return paths


def _load_run_model(run_dir: Path, device: str) -> tuple[Any, Any, int, Any]:
    folders = checkpoint_dirs(run_dir)
    if not folders:
        raise DataError(f"{run_dir}: no checkpoints to evaluate")
    best = run_dir / "checkpoints" / "best"
    model = load_checkpoint(best if best in folders else folders[-1], device=device)
    cfg, tok, val = run_validation_tokens(run_dir)
    return model, tok, cfg.data.seq_len or model.config.max_seq_len, val


def _long_sample(model: Any, tok: Any, name: str, prompt: str, length: int, context: int, seed: int) -> str:
    """Sample `length` tokens; mark where the trained context ends; distinct-2 before and after it."""
    ids = tok.encode(prompt, bos=bool(tok.add_bos and tok.bos_id is not None)) or [tok.bos_id or 0]
    gen = GenerationConfig(max_new_tokens=length - len(ids), seed=seed, past_context=True,  # the experiment
                           sampling=SamplingConfig(temperature=0.8, top_k=50))
    new = generate_ids(model, [ids], gen)[0]
    full = ids + new
    cut = min(context, len(full))
    head, tail = full[:cut], full[cut:]
    return (f"### {name}: {len(new)} tokens sampled (temperature 0.8, top-k 50, seed {seed}); "
            f"distinct-2 inside the context {_distinct2(head):.3f}, past it {_distinct2(tail):.3f}\n"
            f"{tok.decode(head)}\n[--- trained context ends here ---]\n{tok.decode(tail)}\n")


def _distinct2(ids: Sequence[int]) -> float:
    """Share of distinct bigrams: falls towards 0 when a model degenerates into repetition."""
    pairs = list(zip(ids, ids[1:]))
    return len(set(pairs)) / len(pairs) if pairs else float("nan")
