"""The training session: everything around the one loop that every recipe kind needs, written once.

A task (pretraining, SFT, classification, DPO, reward model, verifier) is a thin setup: it builds its data,
its model and its objective and hands them to a Session, which owns the rest:

    Session(cfg) -> processes, device + autocast policy, threads, seeds, an exclusive lock on the run folder,
                    the check that the folder holds nothing a changed config would splice into, config.yaml
    .max_steps / .finished -> run length from max_steps or epochs; "already finished" on re-run
    .fit(model, objective, batches, ...) -> DDP/FSDP/compile wrapping, AdamW + schedule, FitConfig,
                    checkpointer, exact resume (falling back past a corrupt newest checkpoint), metrics.jsonl,
                    MFU, the best checkpoint by the task's selection metric
    .end_on_best(model, result, evaluated) -> with checkpoint.best, that checkpoint's weights; the kept step
    .summary(...) / .finish(...) -> summary.json (atomic) and the one line the run prints

so a new objective is a loss function and a setup, never a new loop or a fifth copy of this file.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import yaml
from torch import nn

from lmlab.data.batch import Batch
from lmlab.errors import CheckpointError, ConfigError
from lmlab.fileio import LOCK_FILE, FolderLock, atomic_write_text
from lmlab.model.transformer import unwrap
from lmlab.precision import Precision, peak_flops, peak_memory_mb, resolve_device
from lmlab.schema.load import changed_keys, save_config
from lmlab.schema.sections import DistributedSection, RecipeConfig
from lmlab.train.distributed import seed_everything, setup_distributed, wrap_model
from lmlab.train.logger import MetricsLogger
from lmlab.train.loop import BatchSource, EvalHook, FitConfig, FitResult, fit
from lmlab.train.losses import Objective
from lmlab.train.optim import make_adamw, param_groups
from lmlab.train.schedule import Schedule
from lmlab.train.state import Checkpointer, Progress, load_train_state, load_weights

SUMMARY = "summary.json"
RESULT_FILES = (SUMMARY, "metrics.json", "metrics.jsonl")
"""Files whose presence means the folder holds an earlier run's results (config.yaml alone does not)."""
T = TypeVar("T")


class Session:
    """One training run's surroundings (see the module docstring). Use as a context manager: the folder
    lock is released and the process group torn down however the run ends."""

    def __init__(self, cfg: RecipeConfig, *, distributed: DistributedSection | None = None) -> None:
        self.t0 = time.perf_counter()
        self.cfg, self.out = cfg, Path(cfg.out_dir)
        backend = distributed.backend if distributed else "auto"
        self.dist, device = setup_distributed(cfg.precision.device, backend)
        if self.dist.world > 1 and distributed is None:
            raise ConfigError(f"{type(cfg).__name__} recipes train in one process; torchrun is for `lmlab run`")
        self.distributed = distributed
        self.flops_per_token, self.peak_flops, self.select = 0.0, 0.0, "val.loss"
        self.precision = Precision(resolve_device(device), cfg.precision.dtype)  # rejects bad combos first
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        seed_everything(cfg.train.seed)
        self.checkpointer = Checkpointer(self.out / "checkpoints", keep_last=cfg.checkpoint.keep_last,
                                         is_main=self.is_main)
        self._lock: FolderLock | None = None
        try:
            check_run_folder(self.out)  # before the lock file: never write into a folder of someone else's
            self._lock = FolderLock(self.out) if self.is_main else None
            self._check_folder()
            if self.is_main:
                for name in self.checkpointer.clean():
                    print(f"{self.out}: removed {name}, left by an interrupted checkpoint write", file=sys.stderr)
                save_config(cfg, self.out / "config.yaml")
        except BaseException:
            self.close()
            raise

    # -------------------------------------------------------------------------------------------- folder

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def device(self) -> torch.device:
        return self.precision.device

    def _check_folder(self) -> None:
        """Refuse what would mix two runs: checkpoints under resume=false, or earlier results (or
        checkpoints) under a config that differs outside the resume-safe keys. A folder with only a
        config.yaml (a run that stopped before it trained) is fair game."""
        has_checkpoints = self.checkpointer.latest() is not None
        if has_checkpoints and not self.cfg.checkpoint.resume:
            raise ConfigError(f"{self.out}: holds checkpoints of an earlier run and checkpoint.resume=false; "
                              "use a new out_dir (or resume=true to continue that run); nothing was deleted")
        if has_checkpoints or any((self.out / name).exists() for name in RESULT_FILES):
            changed = changed_keys(self.out, self.cfg)
            if changed:
                raise ConfigError(f"{self.out}: holds the results of a run with a different config "
                                  f"({', '.join(changed[:8])}); resuming or overwriting would splice two runs. "
                                  "Use another out_dir, or the same settings to resume.")

    def main_first(self, fn: Callable[[], T]) -> T:
        """fn() on rank 0 first, then on the others (e.g. rank 0 fills a cache the others then read)."""
        result: Any = None
        for turn in ([0, 1] if self.dist.world > 1 else [0]):
            if self.is_main == (turn == 0):
                result = fn()
            if self.dist.world > 1:
                torch.distributed.barrier()
        return result

    # -------------------------------------------------------------------------------------------- length

    def max_steps(self, steps_per_epoch: int | None) -> int:
        """train.max_steps, or train.epochs x the steps an epoch takes."""
        t = self.cfg.train
        if t.max_steps > 0:
            return t.max_steps
        if t.epochs <= 0:
            raise ConfigError("set train.max_steps or train.epochs (both are 0)")
        if not steps_per_epoch:
            raise ConfigError("train.epochs needs a training split with at least one batch")
        return max(1, math.ceil(t.epochs * steps_per_epoch))

    def eval_every(self, steps_per_epoch: int | None) -> int:
        """train.eval_every, else once per epoch for a run sized by epochs, else only at the end."""
        t = self.cfg.train
        if t.eval_every:
            return t.eval_every
        return steps_per_epoch or 0 if t.max_steps == 0 else 0

    def finished(self, max_steps: int) -> bool:
        """True (and says so) when the folder holds this run's summary and its last checkpoint."""
        latest = self.checkpointer.latest()
        done = latest is not None and (self.out / SUMMARY).is_file() and _step_of(latest) >= max_steps
        if done and self.is_main:
            print(f"{self.out}: already finished ({_step_of(latest)} steps); nothing to do")
        return done

    # -------------------------------------------------------------------------------------------- training

    def fit(self, model: nn.Module, objective: Objective, train_data: BatchSource, *, max_steps: int,
            steps_per_epoch: int | None = None, val_data: Sequence[Batch] = (), evaluate: EvalHook | None = None,
            select: str = "val.loss", mode: Literal["min", "max"] = "min", groups: list[dict] | None = None,
            trainable_only: bool = False, flops_per_token: float = 0.0, tokenizer: Any = None) -> FitResult:
        """Train `model` (already on self.device) with `objective` on `train_data` through the one loop.

        groups: optimizer parameter groups (default: lmlab.train.optim.param_groups of the model), e.g. a
        head at a higher rate. trainable_only: checkpoints hold only the parameters that train (adapters,
        heads): megabytes, and only resume needs them. select/mode: the value of an evaluation that picks
        checkpoints/best (e.g. dev.accuracy, max)."""
        c = self.cfg
        model.train()
        trained = wrap_model(model, self.dist, self.distributed.strategy if self.distributed else "ddp",
                             c.precision.compile)
        o, s = c.optim, c.schedule
        optimizer = make_adamw(groups or param_groups(unwrap(trained), o.weight_decay, o.decay_embeddings), o.impl,
                               o.lr, tuple(o.betas), o.eps)  # after wrapping: FSDP shards the parameters
        schedule = Schedule(o.lr, s.warmup(max_steps), s.decay_steps or max_steps, s.min_lr, s.kind)
        fit_cfg = FitConfig(
            max_steps=max_steps, grad_accum=c.train.grad_accum, grad_clip=c.train.grad_clip,
            eval_every=self.eval_every(steps_per_epoch), log_every=c.logging.log_every,
            checkpoint_every=c.checkpoint.every, keep_best=c.checkpoint.best, select=select, select_mode=mode,
            skip_nonfinite=c.train.skip_nonfinite, progress_bar=c.logging.progress and self.is_main,
            flops_per_token=flops_per_token,
            peak_flops=c.logging.peak_tflops * 1e12 or peak_flops(self.device, self.precision.dtype_name))
        self.checkpointer.tokenizer, self.checkpointer.trainable_only = tokenizer, trainable_only
        progress = self._resume(trained, optimizer) if c.checkpoint.resume else None
        logger = MetricsLogger(self.out / "metrics.jsonl" if self.is_main else None,
                               self.out / "tb" if c.logging.tensorboard and self.is_main else None,
                               resume_step=progress.step if progress else None)
        self.flops_per_token, self.peak_flops, self.select = fit_cfg.flops_per_token, fit_cfg.peak_flops, select
        try:
            return fit(trained, objective, train_data, optimizer, schedule, fit_cfg, self.precision,
                       val_data=val_data, evaluate_hook=evaluate, logger=logger, checkpointer=self.checkpointer,
                       progress=progress)
        finally:
            logger.close()

    def _resume(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Progress | None:
        """Load the newest readable step checkpoint; a corrupt one is reported and the previous one used."""
        for folder in reversed(self.checkpointer.step_dirs()):
            try:
                progress = load_train_state(folder, model, optimizer, self.precision.scaler, self.dist.rank)
            except CheckpointError as err:
                if self.is_main:
                    print(f"warning: skipping {folder}: {err}", file=sys.stderr)
                continue
            if self.is_main:
                print(f"resuming from {folder} (step {progress.step})")
            return progress
        return None

    def end_on_best(self, model: nn.Module, result: FitResult, evaluated: bool) -> int:
        """The step a run ends on: with checkpoint.best, a run that evaluated and kept checkpoints/best gets
        that state's weights put into `model` (the step its selection metric chose); else the last step."""
        best = self.checkpointer.folder / "best"
        if not (evaluated and self.cfg.checkpoint.best and best.is_dir()):
            return result.progress.step
        load_weights(best, model)
        return result.progress.best_step

    # -------------------------------------------------------------------------------------------- results

    def summary(self, trained: nn.Module, result: FitResult, **extra: Any) -> dict[str, Any]:
        """The facts every run reports: losses and evaluations, length, time, throughput, MFU, memory."""
        p, raw = result.progress, unwrap(trained)
        tok_s = p.tokens_seen / max(p.elapsed_s, 1e-9)
        val = result.val_loss
        n_params = raw.num_params() if hasattr(raw, "num_params") else sum(q.numel() for q in raw.parameters())
        return {
            "train_loss": result.train_loss, **{f"train_{k}": v for k, v in result.train_metrics.items()},
            "val_loss": val, "val_ppl": math.exp(min(val, 50)) if val is not None and "ppl" in
            result.eval.get("val", {}) else None,
            "eval": result.eval, "best": {"metric": self.select, "value": p.best_metric, "step": p.best_step},
            "steps": p.step, "tokens_seen": p.tokens_seen, "train_time_s": p.elapsed_s,
            "wall_time_s": time.perf_counter() - self.t0, "tokens_per_s": tok_s,
            "mfu": self.flops_per_token * tok_s / self.peak_flops if self.peak_flops else None,
            "n_params": n_params, "trainable_params": sum(q.numel() for q in raw.parameters() if q.requires_grad),
            "peak_mem_mb": max(result.peak_mem_mb, peak_memory_mb(self.device)), "out_dir": str(self.out), **extra,
        }

    def finish(self, summary: dict[str, Any], line: str = "") -> dict[str, Any]:
        """Write summary.json (main process, atomically) and print the run's one-line result."""
        if self.is_main:
            summary["wall_time_s"] = time.perf_counter() - self.t0
            atomic_write_text(self.out / SUMMARY, json.dumps(summary, indent=2, default=str) + "\n")
            print(line or self.default_line(summary))
        return summary

    def default_line(self, s: dict[str, Any]) -> str:
        val = s.get("val_loss")
        return (f"{self.out}: " + (f"val_loss {val:.4f}, " if val is not None else "")
                + f"train_loss {s['train_loss']:.4f}, {s['steps']} steps in {s['train_time_s']:.1f} s "
                f"(wall {s['wall_time_s']:.1f} s, {s['tokens_per_s']:,.0f} tokens/s)")

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self.dist.world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def check_run_folder(out: Path) -> None:
    """A run writes config.yaml, metrics.jsonl, summary.json, checkpoints/ into out_dir: it must be new,
    empty, or an earlier lmlab run's folder, never a folder of someone else's files (out_dir=. in a project,
    a folder of runs) whose files of those names it would overwrite."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir={out}: is a file, expected a run folder; nothing was written")
    if not out.is_dir() or (out / LOCK_FILE).exists() or _is_run_config(out / "config.yaml"):
        return
    entries = sorted(p.name for p in itertools.islice(out.iterdir(), 6))
    if entries:
        raise ConfigError(f"out_dir={out}: holds files lmlab did not write ({', '.join(entries[:5])}"
                          f"{', ...' if len(entries) > 5 else ''}); a run needs a new or empty folder, or an "
                          "earlier run's; nothing was written")


def _is_run_config(path: Path) -> bool:
    """Whether `path` is the config.yaml an lmlab run wrote (a mapping with out_dir and train)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return path.is_file()  # unreadable: _check_folder reports it by name
    return isinstance(data, dict) and "out_dir" in data and "train" in data


def _step_of(folder: Path) -> int:
    return int(folder.name.removeprefix("step_"))

