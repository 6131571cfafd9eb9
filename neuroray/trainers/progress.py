"""Training progress where the user is: the driver's terminal, one line per report.

Ray Train runs the loop in worker processes and its callbacks in a controller actor, so neither
can write to the user's terminal directly (their output comes back prefixed with process ids).
:class:`ProgressCallback` (a Train ``UserCallback``, run by the controller after every report)
hands rank 0's metrics to a :class:`ProgressBoard` actor; :class:`DriverProgress`, a thread in
the driver, takes them from the board and prints, per report,
``step 40/100 (40%) | loss 0.4123 | 3.2 samples/s | ETA 1m20s``, or moves a tqdm bar when
stderr is a terminal. With ``run.time_budget_s`` the ETA is the budget's remainder whenever the
budget ends the run first. It also prints the TensorBoard command for the run, redraws the run's
``loss.png`` (:mod:`neuroray.trainers.curves`) at every checkpoint, and silences Train's own
``Reporting training result N: TrainingReport(...)`` lines in the workers
(``run.ray_report_logs=true`` keeps them).
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuroray.trainers.settings import TrainJob

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- what one line says
@dataclass(frozen=True)
class ProgressState:
    """Where a run stands after one report."""

    step: int
    total: int
    loss: float | None
    samples_per_s: float | None
    eta_s: float | None
    eta_from: str  # "steps", "budget" or "" (not yet known)
    checkpoint: bool = False

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total) if self.total else 0.0


def format_duration(seconds: float | None) -> str:
    """``1h02m``, ``3m05s``, ``12s``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def progress_fields(state: ProgressState) -> str:
    """Everything after step/total: loss, samples/s, ETA (and a checkpoint mark)."""
    parts = []
    if state.loss is not None:
        parts.append(f"loss {state.loss:.4g}")
    if state.samples_per_s is not None:
        parts.append(f"{state.samples_per_s:.3g} samples/s")
    eta = f"ETA {format_duration(state.eta_s)}"
    if state.eta_from == "budget":
        eta += " (time budget)"
    parts.append(eta)
    if state.checkpoint:
        parts.append("checkpoint")
    return " | ".join(parts)


def progress_line(state: ProgressState, name: str | None = None) -> str:
    """``[name] step 40/100 (40%) | loss 0.4123 | 3.2 samples/s | ETA 1m20s``."""
    head = f"[{name}] " if name else ""
    percent = int(100 * state.fraction)
    return f"{head}step {state.step}/{state.total} ({percent}%) | {progress_fields(state)}"


class ProgressTracker:
    """Turns the loop's reports (``step``, ``loss``, ``samples_per_s``, ``trained_s``) into
    :class:`ProgressState`, estimating the time left.

    The rate is measured on the driver's clock between reports (so validation and checkpoint
    writing count, as they do for the user waiting); before a second report it comes from the
    loop's own samples/s. With a time budget the run ends at ``budget_s`` seconds of training
    time, whichever of steps and time comes first.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        budget_s: float | None = None,
        samples_per_step: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = int(total_steps)
        self.budget_s = budget_s
        self.samples_per_step = samples_per_step
        self.clock = clock
        self._first: tuple[int, float] | None = None

    def update(self, metrics: Mapping[str, Any], checkpoint: bool = False) -> ProgressState:
        now = self.clock()
        step = int(metrics.get("step", 0))
        if self._first is None:
            self._first = (step, now)
        first_step, first_time = self._first
        seconds_per_step = None
        if step > first_step and now > first_time:
            seconds_per_step = (now - first_time) / (step - first_step)
        else:
            rate = _finite(metrics.get("samples_per_s"))
            if rate and self.samples_per_step:
                seconds_per_step = self.samples_per_step / rate
        eta_s = None if seconds_per_step is None else max(0, self.total - step) * seconds_per_step
        eta_from = "" if eta_s is None else "steps"
        trained_s = _finite(metrics.get("trained_s"))
        if self.budget_s and trained_s is not None:
            left = max(0.0, self.budget_s - trained_s)
            if eta_s is None or left < eta_s:
                eta_s, eta_from = left, "budget"
        if step >= self.total:
            eta_s, eta_from = 0.0, "steps"
        return ProgressState(
            step=step,
            total=self.total,
            loss=_finite(metrics.get("loss")),
            samples_per_s=_finite(metrics.get("samples_per_s")),
            eta_s=eta_s,
            eta_from=eta_from,
            checkpoint=checkpoint,
        )


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------------- from workers to driver
class ProgressBoard:
    """A mailbox actor (no CPU): the controller's callback puts reports, the driver takes them."""

    def __init__(self) -> None:
        self._reports: list[dict[str, Any]] = []

    def put(self, report: dict[str, Any]) -> None:
        self._reports.append(report)

    def take(self) -> list[dict[str, Any]]:
        reports, self._reports = self._reports, []
        return reports


def _callback_class() -> type:
    from ray.train import UserCallback

    class ProgressCallback(UserCallback):
        """Runs in Train's controller after every report: rank 0's metrics to the board."""

        def __init__(self, board: Any) -> None:
            self.board = board

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
            if metrics:
                self.board.put.remote(
                    {"metrics": dict(metrics[0]), "checkpoint": checkpoint is not None}
                )

    return ProgressCallback


def silence_report_logs() -> None:
    """Drop Train's per-report ``Reporting training result N: TrainingReport(...)`` INFO lines in
    this worker. Train logs them through a logger named by its module's file, outside the
    ``ray.train`` hierarchy its ``LoggingConfig`` governs, so the logger is set to WARNING here."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: nothing to silence here
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def progress_mode(setting: str, stream: Any = None) -> str:
    """``bar`` or ``lines`` for ``auto`` (a bar when ``stream``, default stderr, is a terminal)."""
    if setting != "auto":
        return setting
    stream = stream or sys.stderr
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):
        return "lines"


class DriverProgress:
    """Prints a run's progress in the driver while ``fit`` runs (a context manager).

    ``callback`` goes into the run's ``RunConfig(callbacks=...)``. On exit the last reports are
    printed and ``loss.png`` is drawn once more.
    """

    POLL_S = 0.5

    def __init__(self, job: TrainJob, *, out: Any = None) -> None:
        self.job = job
        run = job.run
        self.mode = progress_mode(run.progress)
        self.out = out or sys.stdout
        self.tracker = ProgressTracker(
            run.steps,
            budget_s=run.time_budget_s,
            samples_per_step=run.batch_size * run.num_workers,
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar: Any = None
        self.board: Any = None
        self.callback: Any = None

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> DriverProgress:
        import ray

        run = self.job.run
        self._say(
            f"neuroray: training run {run.name!r} for {run.steps} steps"
            + (f" or {format_duration(run.time_budget_s)} of training" if run.time_budget_s else "")
            + f"; checkpoints in {run.run_dir()}"
        )
        self._say(f"neuroray: TensorBoard: tensorboard --logdir {run.tensorboard_path().resolve()}")
        if self.mode == "off":
            return self
        self.board = ray.remote(num_cpus=0)(ProgressBoard).remote()
        self.callback = _callback_class()(self.board)
        self._thread = threading.Thread(target=self._loop, name="neuroray-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        import ray

        self._stop.set()
        try:  # nothing here may hide the run's own outcome
            if self._thread is not None:
                self._thread.join(timeout=5)
                time.sleep(0.2)  # the controller's last put may still be on its way
                self._drain()
            if self._bar is not None:
                self._bar.close()
            if self.board is not None:
                ray.kill(self.board)
        except Exception as err:
            log.debug("progress: %s", err)
        path = self._draw_curves()
        if path is not None:
            self._say(f"neuroray: training curves: {path}")

    # -- the thread -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.wait(self.POLL_S):
            try:
                self._drain()
            except Exception as err:  # progress must never take a run down
                log.debug("progress: %s", err)

    def _drain(self) -> None:
        import ray

        if self.board is None:
            return
        reports = ray.get(self.board.take.remote(), timeout=10)
        for report in reports:
            self._show(self.tracker.update(report["metrics"], report.get("checkpoint", False)))
        if any(report.get("checkpoint") for report in reports):
            self._draw_curves()

    def _show(self, state: ProgressState) -> None:
        if self.mode == "bar":
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(
                    total=state.total,
                    initial=0,
                    unit="step",
                    desc=self.job.run.name,
                    dynamic_ncols=True,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {postfix}",
                )
            self._bar.n = min(state.step, state.total)
            self._bar.set_postfix_str(progress_fields(state), refresh=False)
            self._bar.refresh()
        else:
            self._say(progress_line(state, self.job.run.name))

    def _say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def _draw_curves(self) -> Path | None:
        from neuroray.trainers.curves import write_curves

        try:
            return write_curves(self.job)
        except Exception as err:  # a figure must never fail a finished run
            log.warning("could not draw the training curves: %s", err)
            return None
