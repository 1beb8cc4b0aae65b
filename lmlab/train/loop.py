"""The one training loop. Pretraining, fine-tuning, classification, DPO and verifiers differ only in the
objective and the batch source they hand to `fit` (see lmlab/train/losses.py); there is no mode flag.

Per optimizer step: for each micro-batch, forward under autocast, `objective` -> LossOutput, backward the
*sum*; then add sums, counts and metric sums over micro-batches and processes and scale the gradients
once by 1/count (token-weighted accumulation, STYLE.md point 8), clip, step. The loss and the gradient
norm are checked before the update, so a NaN/inf never reaches the weights: the run stops naming the step
(or skips the step, up to `skip_nonfinite` times) and the last checkpoint stays a good one.

Evaluation (every `eval_every` steps and at the end) runs the objective on the validation batches and an
optional hook (dev accuracy, say); the value `select` names picks the best checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lmlab.data.batch import Batch
from lmlab.errors import LmlabError
from lmlab.precision import Precision, peak_memory_mb
from lmlab.train.logger import MetricsLogger
from lmlab.train.losses import LossOutput, Objective
from lmlab.train.state import Checkpointer, Progress

BatchSource = Callable[[int, int], Batch]  # (step, micro) -> batch
EvalHook = Callable[[nn.Module, int], dict[str, dict[str, float]]]  # (model, step) -> {split: {metric: value}}


class TrainingDiverged(LmlabError):
    """The loss or the gradient norm became NaN or infinite."""


@dataclass
class FitConfig:
    """Loop cadence; the training session (lmlab/train/session.py) fills it from the recipe."""

    max_steps: int
    grad_accum: int = 1
    grad_clip: float = 1.0
    eval_every: int = 0
    log_every: int = 10
    checkpoint_every: int = 0
    keep_best: bool = True
    select: str = "val.loss"
    """`split.metric` that picks the best checkpoint (val.loss, dev.accuracy, ...)."""
    select_mode: Literal["min", "max"] = "min"
    skip_nonfinite: int = 0
    progress_bar: bool = True
    flops_per_token: float = 0.0
    peak_flops: float = 0.0


@dataclass
class FitResult:
    """What the run ended with (summary.json is built from it)."""

    progress: Progress
    train_loss: float = float("nan")
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval: dict[str, dict[str, float]] = field(default_factory=dict)
    """The last evaluation: {split: {metric: value}}."""
    peak_mem_mb: float = 0.0

    @property
    def val_loss(self) -> float | None:
        return self.eval.get("val", {}).get("loss")


def fit(
    model: nn.Module,
    objective: Objective,
    train_data: BatchSource,
    optimizer: torch.optim.Optimizer,
    schedule: Callable[[int], float],
    cfg: FitConfig,
    precision: Precision,
    *,
    val_data: Sequence[Batch] = (),
    evaluate_hook: EvalHook | None = None,
    logger: MetricsLogger | None = None,
    checkpointer: Checkpointer | None = None,
    progress: Progress | None = None,
) -> FitResult:
    """Train `model` from `progress.step` to `cfg.max_steps`; returns the final metrics."""
    p = progress or Progress()
    result = FitResult(progress=p)
    logger = logger or MetricsLogger(None)
    bar = tqdm(total=cfg.max_steps, initial=p.step, disable=not cfg.progress_bar, unit="step", dynamic_ncols=True,
               mininterval=0.5)
    base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
    for g, lr0 in zip(optimizer.param_groups, base_lrs):
        g["initial_lr"] = lr0  # per-group multipliers of the schedule (e.g. a head at a higher lr)
    model.train()
    t_start, t_log, tokens_log = time.perf_counter() - p.elapsed_s, time.perf_counter(), 0
    skipped = 0

    def save(name: str, **meta: Any) -> None:
        if checkpointer is not None:
            p.elapsed_s = time.perf_counter() - t_start
            checkpointer.save(name, model, optimizer, p, precision.scaler, meta)

    try:
        while p.step < cfg.max_steps:
            lr = schedule(p.step)
            for g, lr0 in zip(optimizer.param_groups, base_lrs):
                g["lr"] = lr * lr0 / base_lrs[0]
            sums, n_inputs, perplexity = _accumulate(model, objective, train_data, p.step, cfg.grad_accum, precision)
            loss = sums["loss"] / max(sums["count"], 1)
            grad_norm = _clip_norm(optimizer, precision, cfg.grad_clip, sums["count"]) if math.isfinite(loss) else loss
            if not (math.isfinite(loss) and (math.isfinite(grad_norm) or precision.scaler)):
                optimizer.zero_grad(set_to_none=True)
                what = "loss" if not math.isfinite(loss) else "gradient norm"
                if skipped >= cfg.skip_nonfinite:
                    raise TrainingDiverged(
                        f"{what} is {loss if what == 'loss' else grad_norm} at step {p.step + 1}; stopped before "
                        f"updating the weights (last good checkpoint: {checkpointer.latest() if checkpointer else 'none'}"
                        f"{f'; {skipped} step(s) skipped before' if skipped else ''}); lower optim.lr or set "
                        "train.skip_nonfinite=N to skip such steps")
                skipped += 1
                logger.log(dict(step=p.step + 1, skipped=True, reason=f"{what} not finite"))
            else:
                _step(optimizer, precision)
            p.step += 1
            p.tokens_seen += n_inputs
            tokens_log += n_inputs
            result.train_loss = loss
            result.train_metrics = _means(sums)
            bar.update(1)
            if p.step % cfg.log_every == 0 or p.step == cfg.max_steps:
                now = time.perf_counter()
                tok_s = tokens_log / max(now - t_log, 1e-9)
                line = dict(step=p.step, loss=loss, **_ppl(loss, perplexity), **result.train_metrics, lr=lr,
                            grad_norm=grad_norm, tokens_per_s=tok_s,
                            mfu=cfg.flops_per_token * tok_s / cfg.peak_flops if cfg.peak_flops else None,
                            peak_mem_mb=peak_memory_mb(precision.device), tokens_seen=p.tokens_seen,
                            elapsed_s=now - t_start)
                logger.log(line)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                t_log, tokens_log = now, 0
            last = p.step == cfg.max_steps
            if (val_data or evaluate_hook) and ((cfg.eval_every and p.step % cfg.eval_every == 0) or last):
                result.eval = _evaluate_all(model, objective, val_data, evaluate_hook, precision, p.step)
                for split, metrics in result.eval.items():
                    logger.log(dict(step=p.step, split=split, **metrics, tokens_seen=p.tokens_seen,
                                    elapsed_s=time.perf_counter() - t_start))
                value = _selected(result.eval, cfg.select)
                if value is not None and _better(value, p.best_metric, cfg.select_mode):
                    p.best_metric, p.best_step = value, p.step
                    if cfg.keep_best:
                        save("best", **{cfg.select: value})
            if (cfg.checkpoint_every and p.step % cfg.checkpoint_every == 0) or last:
                save(checkpointer.step_name(p.step) if checkpointer else "", train_loss=loss)
    finally:
        bar.close()
    p.elapsed_s = time.perf_counter() - t_start
    result.peak_mem_mb = peak_memory_mb(precision.device)
    return result


# ----------------------------------------------------------------------------------------------------
# helpers around the loop


def _accumulate(model: nn.Module, objective: Objective, data: BatchSource, step: int, grad_accum: int,
                precision: Precision) -> tuple[dict[str, float], int, bool]:
    """Backward the summed loss of each micro-batch; returns the sums (loss, count, metrics) over all
    processes, the input tokens processed and whether the loss is a token NLL. Gradients are left
    unnormalized (see `_clip_norm`)."""
    keys: list[str] = []
    sums: Tensor | None = None
    n_inputs, perplexity = 0, False
    for micro in range(grad_accum):
        batch = {k: v.to(precision.device, non_blocking=True) for k, v in data(step, micro).items()}
        with _grad_sync(model, micro == grad_accum - 1), precision.autocast():
            out = objective(model, batch)
        (precision.scaler.scale(out.loss) if precision.scaler else out.loss).backward()
        if sums is None:
            keys = ["loss", "count", *out.metrics]
            sums = torch.zeros(len(keys), dtype=torch.float64, device=precision.device)
        sums += _row(out, keys, precision.device)
        n_inputs += out.tokens
        perplexity = out.perplexity
    world = _all_reduce(sums)
    return dict(zip(keys, sums.tolist())), n_inputs * world, perplexity


def _row(out: LossOutput, keys: list[str], device: torch.device) -> Tensor:
    """(loss, count, metric...) of one micro-batch as float64, detached, in `keys` order."""
    values = [out.loss.detach(), out.count, *(out.metrics[k] for k in keys[2:])]
    return torch.stack([torch.as_tensor(v, device=device).detach().double() for v in values])


def _means(sums: dict[str, float]) -> dict[str, float]:
    """Each metric sum divided by the count."""
    n = max(sums["count"], 1)
    return {k: v / n for k, v in sums.items() if k not in ("loss", "count")}


def _ppl(loss: float, perplexity: bool) -> dict[str, float]:
    return {"ppl": math.exp(min(loss, 50.0))} if perplexity else {}


def _clip_norm(optimizer: torch.optim.Optimizer, precision: Precision, grad_clip: float, count: float) -> float:
    """Divide gradients by the global count once and clip; returns the pre-clip norm (of the divided
    gradients), NaN/inf included, before anything touches the weights."""
    if precision.scaler:
        precision.scaler.unscale_(optimizer)
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    # DDP averaged over processes; undo that to get sum-over-everything / global count. The division and
    # the clipping share one pass over the gradients: norm(g * s) = s * norm(g).
    scale = _world_size() / max(count, 1)
    norm = torch.nn.utils.get_total_norm(grads, foreach=True) * scale if grads else torch.zeros(())
    factor = scale * (grad_clip / (norm + 1e-6)).clamp(max=1.0) if grad_clip > 0 else torch.tensor(scale)
    if grads:
        torch._foreach_mul_(grads, factor.to(grads[0].device))
    return float(norm)


def _step(optimizer: torch.optim.Optimizer, precision: Precision) -> None:
    if precision.scaler:
        precision.scaler.step(optimizer)  # skips the update itself when fp16 gradients overflowed
        precision.scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluate(model: nn.Module, objective: Objective, batches: Sequence[Batch], precision: Precision) -> dict[str, float]:
    """Count-weighted mean loss (and the objective's metrics, and ppl where it applies) over fixed batches,
    all processes together."""
    was_training = model.training
    model.eval()
    sums: Tensor | None = None
    keys: list[str] = []
    perplexity = False
    for batch in batches:
        batch = {k: v.to(precision.device) for k, v in batch.items()}
        with precision.autocast():
            out = objective(model, batch)
        if sums is None:
            keys = ["loss", "count", *out.metrics]
            sums = torch.zeros(len(keys), dtype=torch.float64, device=precision.device)
        sums += _row(out, keys, precision.device)
        perplexity = out.perplexity
    model.train(was_training)
    if sums is None:
        return {}
    _all_reduce(sums)
    totals = dict(zip(keys, sums.tolist()))
    loss = totals["loss"] / max(totals["count"], 1)
    return {"loss": loss, **_ppl(loss, perplexity), **_means(totals)}


def _evaluate_all(model: nn.Module, objective: Objective, val_data: Sequence[Batch], hook: EvalHook | None,
                  precision: Precision, step: int) -> dict[str, dict[str, float]]:
    out = {"val": evaluate(model, objective, val_data, precision)} if val_data else {}
    if hook is not None:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for split, metrics in hook(model, step).items():
                out.setdefault(split, {}).update(metrics)
        model.train(was_training)
    return out


def _selected(evals: dict[str, dict[str, float]], select: str) -> float | None:
    split, _, metric = select.partition(".")
    return evals.get(split, {}).get(metric)


def _better(value: float, best: float | None, mode: str) -> bool:
    if not math.isfinite(value):
        return False
    return best is None or (value < best if mode == "min" else value > best)


def _grad_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce on all but the last micro-batch."""
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(t: Tensor) -> int:
    """Sum `t` over processes in place; returns the world size."""
    world = _world_size()
    if world > 1:
        torch.distributed.all_reduce(t)
    return world
