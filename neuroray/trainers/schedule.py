"""How fast and how long a run trains: the learning-rate schedule and the training clock.

:func:`warmup_cosine` is the multiplier ``torch.optim.lr_scheduler.LambdaLR`` applies per step:
linear warmup, then cosine decay to ``optim.min_lr``. With ``run.time_budget_s`` the cosine follows
whichever of steps and time is further along, so a run cut short by its budget still decays
fully. :class:`TrainingClock` measures that time: seconds inside training steps only, so
validation and checkpoint writing do not eat into a budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from neuroray.trainers.settings import OptimSettings


def warmup_cosine(
    optim: OptimSettings, total_steps: int, time_fraction: Callable[[], float] | None = None
):
    """LR multiplier per step: linear warmup, then cosine from lr down to min_lr.

    With ``time_fraction`` (the share of a time budget used so far) the cosine follows whichever
    of steps and time is further along.
    """
    floor = optim.min_lr / optim.lr

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / (optim.warmup_steps + 1)
        progress = (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps)
        if time_fraction is not None:
            progress = max(progress, time_fraction())
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def frozen_until(schedule, until: int):
    """A group's schedule with lr 0 before step ``until`` (a frozen warm-up that DDP tolerates,
    unlike toggling requires_grad after the model is wrapped)."""
    return lambda step: 0.0 if step < until else schedule(step)


class TrainingClock:
    """Seconds spent in training steps (validation and checkpoints excluded) against a budget.

    With several workers rank 0's clock decides when the budget is spent, so every rank stops
    at the same step (DDP needs them to).
    """

    def __init__(self, budget_s: float | None, world_size: int) -> None:
        self.budget_s = budget_s
        self.world_size = world_size
        self.trained_s = 0.0
        self._since: float | None = None

    def start(self) -> None:
        self._since = time.perf_counter()

    def stop(self) -> None:
        if self._since is not None:
            self.trained_s += time.perf_counter() - self._since
            self._since = None

    def fraction(self) -> float:
        return self.trained_s / self.budget_s if self.budget_s else 0.0

    def spent(self) -> bool:
        if not self.budget_s:
            return False
        spent = self.trained_s >= self.budget_s
        if self.world_size > 1:
            import torch.distributed as dist

            flag = torch.tensor([float(spent)])
            dist.broadcast(flag, src=0)
            spent = bool(flag.item())
        return spent
