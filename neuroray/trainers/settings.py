"""The sections every training job has: ``run`` (where and how long), ``optim`` and ``ray``.

:class:`TrainJob` is the base of every training job (``MAEJob``, ``MSConJob``, ``DbMiMJob``,
``FinetuneJob``); each adds its own model, data and task sections. The loop that runs a job is
:mod:`neuroray.trainers.loop`; its learning-rate schedule and time budget are
:mod:`neuroray.trainers.schedule`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from neuroray.config import RaySettings, StrictModel
from neuroray.paths import OutputPath, RunName, is_remote


class OptimSettings(StrictModel):
    """AdamW with linear warmup then cosine decay to ``min_lr``."""

    lr: float = Field(1.5e-4, gt=0)
    min_lr: float = Field(1e-6, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(10, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    layer_decay: float | None = Field(None, gt=0, le=1)
    """Layer-wise learning-rate decay (fine-tuning); None = one rate for all layers."""


class RunSettings(StrictModel):
    """Where a run lives, how long it trains, and on what."""

    name: RunName = "run"
    storage_path: OutputPath = Field("runs", validate_default=True)
    """Where runs live (a local folder, made absolute where the job is built, or s3:// / gs://)."""
    steps: int = Field(100, ge=1)
    time_budget_s: float | None = Field(None, gt=0)
    """Train for at most this many seconds of loop time (validation and checkpoint writing not
    counted) and then stop at a checkpoint; ``steps`` stays the upper bound. The learning-rate
    schedule follows whichever of steps and time is further along, so a budget-limited run still
    decays fully. Quality comparisons give every row the same budget, not the same steps."""
    batch_size: int = Field(2, ge=1)
    """Crops per worker per step."""
    steps_per_epoch: int = Field(50, ge=1)
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float | None = Field(None, gt=0)
    """CPUs each worker reserves and gives torch as threads. None: the CPUs Ray has free when the
    run starts, shared among the workers (a laptop's whole machine; chunk servers reserve none)."""
    use_gpu: bool = False
    amp: Literal["auto", "bf16", "off"] = "auto"
    """"auto": bf16 autocast on CUDA, full precision on CPU."""
    checkpoint_every: int = Field(50, ge=1)
    report_every: int = Field(10, ge=1)
    preview_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(1, ge=0)
    seed: int = 0
    tensorboard_dir: OutputPath | None = None
    """Default: <storage_path>/<name>/tensorboard for local storage, ./runs/<name>/tensorboard
    for remote storage."""
    progress: Literal["auto", "bar", "lines", "off"] = "auto"
    """How the driver shows progress: one line per report ("lines": step/total, loss,
    samples/s, ETA), a tqdm "bar", "auto" (a bar when stderr is a terminal, else lines) or
    "off". The TensorBoard command is printed either way."""
    ray_report_logs: bool = False
    """Keep Ray Train's raw per-report log lines (``Reporting training result N:
    TrainingReport(...)``), silenced by default in favour of the progress lines."""
    fail_at_step: int | None = None
    """Fault injection for tests and drills: fail once at this step (first attempt only)."""
    fail_mode: Literal["raise", "exit"] = "raise"
    """How ``fail_at_step`` fails: "raise" a Python error in the loop, or "exit" the worker
    process at once (``os._exit``, no cleanup), as a preempted or OOM-killed node would."""

    def run_dir(self) -> str:
        return f"{absolute_storage(self.storage_path)}/{self.name}"

    def tensorboard_path(self) -> Path:
        if self.tensorboard_dir:
            return Path(self.tensorboard_dir)
        if is_remote(self.storage_path):
            return Path("runs") / self.name / "tensorboard"
        return Path(self.run_dir()) / "tensorboard"


class TrainJob(StrictModel):
    """Fields every training job has; concrete jobs add model, data and task sections."""

    run: RunSettings = RunSettings()
    optim: OptimSettings = OptimSettings()
    ray: RaySettings = RaySettings()


def absolute_storage(path: str) -> str:
    """Ray Train needs absolute local paths (or a URI)."""
    if is_remote(path):
        return path.rstrip("/")
    return str(Path(path.removeprefix("file://")).expanduser().resolve())
