"""The learning-rate schedule (warmup, cosine, time budget) and the training clock."""

from __future__ import annotations

import math
import time

import pytest
import torch

from neuroray.trainers.schedule import TrainingClock, frozen_until, warmup_cosine
from neuroray.trainers.settings import OptimSettings

OPTIM = OptimSettings(lr=1e-3, min_lr=1e-5, warmup_steps=4)
FLOOR = OPTIM.min_lr / OPTIM.lr


def test_warmup_rises_linearly_and_reaches_lr_when_it_ends():
    factor = warmup_cosine(OPTIM, total_steps=20)
    warmup = [factor(step) for step in range(OPTIM.warmup_steps)]
    assert warmup == pytest.approx([1 / 5, 2 / 5, 3 / 5, 4 / 5])
    assert all(f < 1 for f in warmup)
    assert factor(OPTIM.warmup_steps) == pytest.approx(1.0)  # the full lr at warmup's end


def test_cosine_decays_monotonically_to_min_lr_and_stays_there():
    total = 20
    factor = warmup_cosine(OPTIM, total_steps=total)
    decay = [factor(step) for step in range(OPTIM.warmup_steps, total + 1)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    assert factor(total) == pytest.approx(FLOOR)
    assert factor(total + 10) == pytest.approx(FLOOR)  # past the end: held at min_lr
    middle = OPTIM.warmup_steps + (total - OPTIM.warmup_steps) // 2
    assert factor(middle) == pytest.approx(FLOOR + (1 - FLOOR) * 0.5)  # cos(pi / 2) = 0


def test_with_a_time_budget_the_schedule_follows_whichever_is_further_along():
    total = 100
    used = {"fraction": 0.0}
    timed = warmup_cosine(OPTIM, total_steps=total, time_fraction=lambda: used["fraction"])
    by_steps = warmup_cosine(OPTIM, total_steps=total)
    step = OPTIM.warmup_steps + 24  # a quarter of the way by steps

    used["fraction"] = 0.1  # time is behind the steps: the steps decide
    assert timed(step) == pytest.approx(by_steps(step))
    used["fraction"] = 0.75  # time is further along: the schedule follows time
    expected = FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * 0.75))
    assert timed(step) == pytest.approx(expected) and timed(step) < by_steps(step)
    used["fraction"] = 1.5  # the budget is spent: min_lr, however few steps were taken
    assert timed(step) == pytest.approx(FLOOR)
    assert timed(0) == by_steps(0)  # warmup is counted in steps only


def test_frozen_until_holds_a_group_at_zero_then_follows_its_schedule():
    factor = warmup_cosine(OPTIM, total_steps=20)
    frozen = frozen_until(factor, 6)
    assert [frozen(step) for step in range(6)] == [0.0] * 6
    assert [frozen(step) for step in range(6, 21)] == [factor(step) for step in range(6, 21)]


def test_lambda_lr_applies_the_factors_to_each_group():
    """As run_worker wires it: one LambdaLR over groups with and without a frozen start."""
    weights = torch.nn.Parameter(torch.zeros(2))
    head = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [weights]}, {"params": [head]}], lr=OPTIM.lr)
    factor = warmup_cosine(OPTIM, total_steps=10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [factor, frozen_until(factor, 3)])
    seen = []
    for _ in range(10):
        seen.append(scheduler.get_last_lr())
        optimizer.step()
        scheduler.step()
    for step, (lr, lr_frozen) in enumerate(seen):
        assert lr == pytest.approx(OPTIM.lr * factor(step))
        assert lr_frozen == (0.0 if step < 3 else pytest.approx(lr))
    assert scheduler.get_last_lr()[0] == pytest.approx(OPTIM.min_lr)


def test_clock_counts_only_the_time_between_start_and_stop():
    clock = TrainingClock(budget_s=60.0, world_size=1)
    clock.stop()  # a stop without a start adds nothing
    assert clock.trained_s == 0.0
    for _ in range(2):
        clock.start()
        time.sleep(0.05)
        clock.stop()
        time.sleep(0.3)  # validation, checkpoints: not training time
    assert 0.1 <= clock.trained_s < 0.4
    assert clock.fraction() == pytest.approx(clock.trained_s / 60.0)
    assert not clock.spent()


def test_clock_is_spent_at_its_budget():
    clock = TrainingClock(budget_s=2.0, world_size=1)
    clock.trained_s = 1.99  # as a resumed run restores it from train_state.pt
    assert not clock.spent() and clock.fraction() == pytest.approx(0.995)
    clock.trained_s = 2.0
    assert clock.spent() and clock.fraction() == pytest.approx(1.0)


def test_without_a_budget_the_clock_is_never_spent():
    clock = TrainingClock(budget_s=None, world_size=4)  # no broadcast needed either
    clock.trained_s = 1e9
    assert not clock.spent()
    assert clock.fraction() == 0.0
