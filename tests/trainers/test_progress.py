"""Training progress lines and loss.png, from recorded reports and real TensorBoard events (no
Ray: the end-to-end run is in test_pretrain.py and test_job_submit.py)."""

from __future__ import annotations

import pytest
from PIL import Image

from neuroray.trainers.curves import plot_curves, read_scalars
from neuroray.trainers.progress import (
    ProgressTracker,
    format_duration,
    progress_line,
    progress_mode,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# What rank 0 of a 30-step run reports every 10 steps (batch 2, one worker), as fit() sees them.
RECORDED = [
    {"step": 10, "loss": 0.91, "samples_per_s": 4.0, "trained_s": 5.0, "lr": 1e-4},
    {"step": 20, "loss": 0.52, "samples_per_s": 4.0, "trained_s": 10.0, "lr": 8e-5},
    {"step": 30, "loss": 0.40, "samples_per_s": 4.0, "trained_s": 15.0, "lr": 1e-6},
]


def test_each_report_becomes_one_line_with_step_total_loss_rate_and_eta():
    clock = FakeClock()
    tracker = ProgressTracker(30, samples_per_step=2, clock=clock)
    lines = []
    for report in RECORDED:
        lines.append(progress_line(tracker.update(report), "mae"))
        clock.now += 6.0  # 10 steps of wall time, validation and checkpoints included
    assert lines[0].startswith("[mae] step 10/30 (33%) | loss 0.91 | 4 samples/s | ETA ")
    # first report: 0.5 s per step from samples/s (2 per step at 4/s), 20 steps left
    assert "ETA 10s" in lines[0]
    # then the driver's own clock: 6 s per 10 steps, 10 steps left
    assert "step 20/30 (66%)" in lines[1] and "ETA 6s" in lines[1]
    assert "step 30/30 (100%)" in lines[2] and "ETA 0s" in lines[2]
    assert all(line.count("\n") == 0 for line in lines)


def test_a_time_budget_gives_the_eta_when_it_ends_the_run_first():
    clock = FakeClock()
    tracker = ProgressTracker(1000, budget_s=12.0, samples_per_step=2, clock=clock)
    tracker.update(RECORDED[0])
    clock.now += 6.0
    state = tracker.update(RECORDED[1])  # 980 steps left at 0.6 s, but 2 s of budget
    assert state.eta_from == "budget" and state.eta_s == pytest.approx(2.0)
    assert "ETA 2s (time budget)" in progress_line(state)


def test_durations_and_modes():
    assert [format_duration(s) for s in (None, 0, 59.4, 65, 3725)] == [
        "?", "0s", "59s", "1m05s", "1h02m",
    ]  # fmt: skip

    class Stream:
        def __init__(self, tty: bool) -> None:
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    assert progress_mode("auto", Stream(True)) == "bar"
    assert progress_mode("auto", Stream(False)) == "lines"
    assert progress_mode("off", Stream(True)) == "off"


def _write_events(directory, scalars: dict[str, list[tuple[int, float]]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(directory))
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()


def _panels(png) -> int:
    """Panels in a curves figure: 420 px of width each (4.2 in at 100 dpi)."""
    return round(Image.open(png).width / 420)


def test_loss_png_has_the_loss_and_for_dbmim_reward_entropy_and_mask_ratio(tmp_path):
    mae = tmp_path / "mae" / "tensorboard"
    _write_events(mae, {"train/loss": [(3, 1.0), (6, 0.7)], "train/loss_pix": [(3, 0.9)],
                        "train/mask_ratio": [(3, 0.75), (6, 0.75)]})  # fmt: skip
    _write_events(mae, {"train/loss": [(6, 0.6), (9, 0.5)]})  # a resumed start rewrites step 6
    scalars = read_scalars(mae)
    assert scalars["train/loss"] == ([3, 6, 9], [1.0, pytest.approx(0.6), 0.5])
    png = plot_curves(scalars, tmp_path / "mae" / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _panels(png) == 1  # MAE's constant mask ratio gets no panel

    dbmim = tmp_path / "dbmim" / "tensorboard"
    _write_events(dbmim, {"train/loss": [(5, 1.0), (10, 0.8)], "train/mask_ratio": [(5, 0.7)],
                          "train/policy_entropy": [(5, 0.69), (10, 0.6)]})  # fmt: skip
    _write_events(dbmim / "rl", {"rl/reward_mean": [(1, 0.0), (2, 0.1)], "rl/entropy": [(1, 0.7)],
                                 "rl/mask_ratio": [(1, 0.7)]})  # fmt: skip
    scalars = read_scalars(dbmim)
    assert {"rl/reward_mean", "rl/entropy", "train/policy_entropy"} <= set(scalars)
    png = plot_curves(scalars, tmp_path / "dbmim" / "loss.png")
    assert _panels(png) == 4  # loss, reward, entropy, mask ratio


def test_no_events_no_figure(tmp_path):
    assert read_scalars(tmp_path / "missing") == {}
    assert plot_curves({}, tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()

