"""Learning-rate schedules: linear warmup, then cosine, linear or constant decay to a floor.

A schedule is a pure function of the step, so resuming needs only the step number.
"""

from __future__ import annotations

import math

from lmlab.errors import ConfigError

KINDS = ("cosine", "linear", "constant")


def lr_at(step: int, lr: float, warmup_steps: int, decay_steps: int, min_lr: float = 0.0, kind: str = "cosine") -> float:
    """Learning rate for optimizer step `step` (0-based).

    Warmup ramps linearly from lr/warmup to lr over `warmup_steps` steps (step 0 is never lr 0, which
    would waste a step); afterwards the decay goes from lr at the end of warmup to `min_lr` at
    `decay_steps` and stays there.
    """
    if kind not in KINDS:
        raise ConfigError(f"schedule.kind={kind!r}: expected one of {KINDS}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if kind == "constant":
        return lr
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    if kind == "linear":
        return lr - (lr - min_lr) * progress
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


class Schedule:
    """`lr_at` bound to one run's settings; `sched(step)` gives the rate."""

    def __init__(self, lr: float, warmup_steps: int, decay_steps: int, min_lr: float = 0.0, kind: str = "cosine"):
        if kind not in KINDS:
            raise ConfigError(f"schedule.kind={kind!r}: expected one of {KINDS}")
        if min_lr > lr:
            raise ConfigError(f"schedule.min_lr={min_lr} is above optim.lr={lr}")
        if warmup_steps < 0 or decay_steps < 0:
            raise ConfigError("schedule.warmup_steps and schedule.decay_steps must be >= 0")
        self.lr, self.warmup_steps, self.decay_steps, self.min_lr, self.kind = lr, warmup_steps, decay_steps, min_lr, kind

    def __call__(self, step: int) -> float:
        return lr_at(step, self.lr, self.warmup_steps, self.decay_steps, self.min_lr, self.kind)
