"""The one training loop. Pretraining, fine-tuning, DPO and verifiers differ only in the loss function
and the batch source they hand to `fit` (see lmlab/train/losses.py); there is no mode flag.

Per optimizer step: for each micro-batch, forward under autocast, `loss_fn` -> (sum, count), backward
the *sum*; then add sums and counts over micro-batches and processes and scale the gradients once by
1/count (token-weighted accumulation, STYLE.md point 8), clip, step. The loss is checked before the
update, so a NaN/inf never reaches the weights and the last good checkpoint stays the newest one.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lmlab.data.batch import Batch
from lmlab.errors import LmlabError
from lmlab.precision import Precision, peak_memory_mb
from lmlab.train.logger import MetricsLogger
from lmlab.train.losses import LossFn
from lmlab.train.state import Checkpointer, Progress

BatchSource = Callable[[int, int], Batch]  # (step, micro) -> batch


class TrainingDiverged(LmlabError):
    """The loss became NaN or infinite."""


@dataclass
class FitConfig:
    """Loop cadence; every field comes from the run config (lmlab/schema/load.py)."""

    max_steps: int
    grad_accum: int = 1
    grad_clip: float = 1.0
    eval_every: int = 0
    log_every: int = 10
    checkpoint_every: int = 0
    keep_best: bool = True
    progress_bar: bool = True
    flops_per_token: float = 0.0
    peak_flops: float = 0.0


@dataclass
class FitResult:
    """What the run ended with (summary.json is built from it)."""

    progress: Progress
    train_loss: float = float("nan")
    val_loss: float | None = None
    peak_mem_mb: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    train_data: BatchSource,
    optimizer: torch.optim.Optimizer,
    schedule: Callable[[int], float],
    cfg: FitConfig,
    precision: Precision,
    *,
    val_data: Sequence[Batch] = (),
    logger: MetricsLogger | None = None,
    checkpointer: Checkpointer | None = None,
    progress: Progress | None = None,
) -> FitResult:
    """Train `model` from `progress.step` to `cfg.max_steps`; returns the final metrics."""
    p = progress or Progress()
    result = FitResult(progress=p)
    logger = logger or MetricsLogger(None)
    bar = _progress_bar(cfg, p.step)
    base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
    for g, lr0 in zip(optimizer.param_groups, base_lrs):
        g["initial_lr"] = lr0  # per-group multipliers of the schedule (e.g. a head at a higher lr)
    model.train()
    t_start, t_log, tokens_log = time.perf_counter() - p.elapsed_s, time.perf_counter(), 0

    def save(name: str, **meta: Any) -> None:
        if checkpointer is not None:
            p.elapsed_s = time.perf_counter() - t_start
            checkpointer.save(name, model, optimizer, p, precision.scaler, meta)

    while p.step < cfg.max_steps:
        lr = schedule(p.step)
        for g, lr0 in zip(optimizer.param_groups, base_lrs):
            g["lr"] = lr * lr0 / base_lrs[0]
        loss_sum, n_tokens, n_inputs = _accumulate(model, loss_fn, train_data, p.step, cfg.grad_accum, precision)
        loss = loss_sum / max(n_tokens, 1)
        if not math.isfinite(loss):
            bar.close()
            logger.close()
            raise TrainingDiverged(
                f"loss is {loss} at step {p.step + 1}; stopped before updating the weights "
                f"(last good checkpoint: {checkpointer.latest() if checkpointer else 'none'})"
            )
        grad_norm = _update(model, optimizer, precision, cfg.grad_clip, n_tokens)
        p.step += 1
        p.tokens_seen += n_inputs
        tokens_log += n_inputs
        result.train_loss = loss
        bar.update(1)
        if p.step % cfg.log_every == 0 or p.step == cfg.max_steps:
            now = time.perf_counter()
            tok_s = tokens_log / max(now - t_log, 1e-9)
            line = dict(step=p.step, loss=loss, ppl=_ppl(loss), lr=lr, grad_norm=grad_norm, tokens_per_s=tok_s,
                        mfu=cfg.flops_per_token * tok_s / cfg.peak_flops if cfg.peak_flops else None,
                        peak_mem_mb=peak_memory_mb(precision.device), tokens_seen=p.tokens_seen,
                        elapsed_s=now - t_start)
            logger.log(line)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            t_log, tokens_log = now, 0
        last = p.step == cfg.max_steps
        if val_data and ((cfg.eval_every and p.step % cfg.eval_every == 0) or last):
            result.val_loss = evaluate(model, loss_fn, val_data, precision)
            logger.log(dict(step=p.step, split="val", loss=result.val_loss, ppl=_ppl(result.val_loss),
                            tokens_seen=p.tokens_seen, elapsed_s=time.perf_counter() - t_start))
            if result.val_loss < p.best_val_loss:
                p.best_val_loss = result.val_loss
                if cfg.keep_best:
                    save("best", val_loss=result.val_loss)
        if (cfg.checkpoint_every and p.step % cfg.checkpoint_every == 0) or last:
            save(checkpointer.step_name(p.step) if checkpointer else "", train_loss=loss)
    bar.close()
    p.elapsed_s = time.perf_counter() - t_start
    result.peak_mem_mb = peak_memory_mb(precision.device)
    return result


# ----------------------------------------------------------------------------------------------------
# helpers around the loop


def _accumulate(model: nn.Module, loss_fn: LossFn, data: BatchSource, step: int, grad_accum: int,
                precision: Precision) -> tuple[float, int, int]:
    """Backward the summed loss of each micro-batch; returns (loss sum, unmasked tokens, input tokens)
    over all processes. Gradients are left unnormalized (see `_update`)."""
    sums = torch.zeros(2, dtype=torch.float64, device=precision.device)
    n_inputs = 0
    for micro in range(grad_accum):
        batch = {k: v.to(precision.device, non_blocking=True) for k, v in data(step, micro).items()}
        with _grad_sync(model, micro == grad_accum - 1), precision.autocast():
            loss, n = loss_fn(model, batch)
        (precision.scaler.scale(loss) if precision.scaler else loss).backward()
        sums += torch.stack([loss.detach().double(), torch.as_tensor(n, device=sums.device).double()])
        n_inputs += batch["input_ids"].numel()
    world = _all_reduce(sums)
    return float(sums[0]), int(sums[1]), n_inputs * world


def _update(model: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision, grad_clip: float,
            n_tokens: int) -> float:
    """Divide gradients by the global token count once, clip, step. Returns the pre-clip grad norm."""
    if precision.scaler:
        precision.scaler.unscale_(optimizer)
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    # DDP averaged over processes; undo that to get sum-over-everything / global token count. The
    # division and the clipping share one pass over the gradients: norm(g * s) = s * norm(g).
    scale = _world_size() / max(n_tokens, 1)
    norm = torch.nn.utils.get_total_norm(grads, foreach=True) * scale if grads else torch.zeros(())
    factor = scale * (grad_clip / (norm + 1e-6)).clamp(max=1.0) if grad_clip > 0 else torch.tensor(scale)
    if grads:
        torch._foreach_mul_(grads, factor.to(grads[0].device))
    if precision.scaler:
        precision.scaler.step(optimizer)
        precision.scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch], precision: Precision) -> float:
    """Token-weighted mean loss over a fixed set of batches (all processes together)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=precision.device)
    for batch in batches:
        batch = {k: v.to(precision.device) for k, v in batch.items()}
        with precision.autocast():
            loss, n = loss_fn(model, batch)
        sums += torch.stack([loss.double(), torch.as_tensor(n, device=sums.device).double()])
    _all_reduce(sums)
    model.train(was_training)
    return float(sums[0] / sums[1].clamp(min=1))


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


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def _progress_bar(cfg: FitConfig, start: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, initial=start, disable=not cfg.progress_bar, unit="step",
                dynamic_ncols=True, mininterval=0.5)


