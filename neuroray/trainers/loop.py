"""Shared Ray Train plumbing: one loop for every pretraining and fine-tuning job.

A job plugs a :class:`TrainTask` (model, batches, loss, previews, hooks) into :func:`fit`, which
runs it on a ``TorchTrainer`` (Train V2 API). The loop owns what every job needs: device and
DDP, bf16 autocast on CUDA, AdamW with warmup + cosine decay, gradient clipping, checkpoints
through ``ray.train.report`` every N steps, resume, and TensorBoard from rank 0. The job's
``run`` / ``optim`` sections are :mod:`neuroray.trainers.settings`; the learning-rate schedule
and the time budget's clock are :mod:`neuroray.trainers.schedule`; what the driver prints while a
run trains, and its ``loss.png``, are :mod:`neuroray.trainers.progress`.

**Resume.** Rerunning with the same ``run.name`` and ``run.storage_path`` continues from the
latest checkpoint (``ray.train.get_checkpoint()``); so does Train's automatic recovery after a
worker failure (``run.max_failures``). Data streams are seeded per (seed, rank, epoch) and
positioned from the global step, so a resumed run reads the crops it would have read.

**Checkpoints** follow the contract in :mod:`neuroray.models.checkpoint` (``model.pt`` +
``job.json``, read by fine-tuning and blockwise inference without this module); the loop adds
``train_state.pt`` (optimizer, scheduler, step, task extras) for resume.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from neuroray.errors import NeurorayError
from neuroray.models.checkpoint import load_tensors, write_model_file
from neuroray.paths import is_remote
from neuroray.trainers.progress import DriverProgress, silence_report_logs
from neuroray.trainers.run_dir import record_run
from neuroray.trainers.schedule import TrainingClock, frozen_until, warmup_cosine
from neuroray.trainers.settings import RunSettings, TrainJob, absolute_storage


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


# ---------------------------------------------------------------------- the task interface
class WorkerInfo:
    """Where this copy of the loop runs."""

    def __init__(self, rank: int, world_size: int, device: torch.device, extras: dict[str, Any]):
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.extras = extras  # driver-side objects (a ServerPool, actor handles) for the task

    @property
    def is_chief(self) -> bool:
        return self.rank == 0


class TrainTask(ABC):
    """What a job plugs into the loop. One instance per worker."""

    kind: str = "task"
    encoder_prefix: str = "encoder."

    def __init__(self, job: TrainJob, worker: WorkerInfo) -> None:
        self.job = job
        self.worker = worker

    @abstractmethod
    def build_model(self) -> nn.Module: ...

    @abstractmethod
    def batches(self, start_step: int) -> Iterator[dict[str, Any]]:
        """Endless batches for this worker, positioned at ``start_step`` (for resume)."""

    @abstractmethod
    def loss(
        self, model: nn.Module, batch: dict[str, Any], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss and scalars to log (already Python floats)."""

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """AdamW groups: no weight decay on biases, norms, tokens and position embeddings.

        A group may carry its own ``lr`` and a ``freeze_until`` step (lr 0 before it).
        """
        return decay_groups(model, self.job.optim.weight_decay)

    def previews(self, model: nn.Module, batch: dict[str, Any], step: int) -> dict[str, np.ndarray]:
        """HxWx3 uint8 images for TensorBoard (rank 0 only)."""
        return {}

    def after_step(self, model: nn.Module, step: int) -> dict[str, float]:
        """Called after every optimiser step (dbMiM publishes weights here)."""
        return {}

    def validate(self, model: nn.Module, step: int) -> dict[str, float]:
        """Validation metrics, run at checkpoints on rank 0 (fine-tuning segments a slab)."""
        return {}

    def postprocess(self) -> dict[str, float]:
        """Choices the last validation made that inference should reuse (stored in model.pt)."""
        return {}

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore what :meth:`state` returned (from a checkpoint)."""


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim <= 1 or name.endswith(("pos_embed", "token", "depth_embed"))
        (no_decay if skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# ---------------------------------------------------------------------- checkpoints
def save_checkpoint(
    directory: Path,
    *,
    task: TrainTask,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    trained_s: float = 0.0,
) -> None:
    write_model_file(
        directory,
        kind=task.kind,
        step=step,
        state_dict=model.state_dict(),
        encoder_prefix=task.encoder_prefix,
        job_json=task.job.model_dump_json(),
        postprocess=task.postprocess(),
    )
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "trained_s": trained_s,
            "extras": task.state(),
        },
        directory / "train_state.pt",
    )


# ---------------------------------------------------------------------- the worker loop
def _autocast(mode: str, device: torch.device):
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def _inject_failure_once(run: RunSettings, step: int) -> None:
    marker = Path(run.run_dir()) / ".injected_failure"
    if is_remote(run.storage_path) or marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    # what failed, and where: a drill (or a test) can check that this process is really gone
    marker.write_text(json.dumps({"step": step, "mode": run.fail_mode, "pid": os.getpid()}))
    if run.fail_mode == "exit":
        os._exit(1)  # a real process death: no exception, no finally blocks, no flushing
    raise RuntimeError(f"injected failure at step {step} (run.fail_at_step)")


def run_worker(task: TrainTask) -> None:
    """The training loop each Ray Train worker runs."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    job, worker = task.job, task.worker
    run, optim = job.run, job.optim
    torch.manual_seed(run.seed)  # same initial weights on every rank (DDP also broadcasts)
    if worker.device.type == "cpu":
        torch.set_num_threads(max(1, int(run.cpus_per_worker or 1)))
    model = task.build_model()
    model = (
        ray.train.torch.prepare_model(model) if worker.world_size > 1 else model.to(worker.device)
    )
    raw_model = unwrap(model)
    optimizer = torch.optim.AdamW(task.param_groups(raw_model), lr=optim.lr, betas=optim.betas)
    clock = TrainingClock(run.time_budget_s, worker.world_size)
    schedule = warmup_cosine(optim, run.steps, clock.fraction if run.time_budget_s else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        [frozen_until(schedule, g.get("freeze_until", 0)) for g in optimizer.param_groups],
    )

    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            weights = load_tensors(Path(directory) / "model.pt")
            state = load_tensors(Path(directory) / "train_state.pt")
        raw_model.load_state_dict(weights["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        task.load_state(state.get("extras", {}))
        clock.trained_s = float(state.get("trained_s", 0.0))
        start_step = int(state["step"])

    writer = None
    if worker.is_chief:
        from torch.utils.tensorboard import SummaryWriter

        _log_start(run, start_step)

        writer = SummaryWriter(str(run.tensorboard_path()))
    batches = task.batches(start_step)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    tick, samples = time.perf_counter(), 0
    step = start_step
    try:
        while step < run.steps and not clock.spent():
            clock.start()
            batch = _to_device(next(batches), worker.device)
            model.train()
            with _autocast(run.amp, worker.device):
                loss, scalars = task.loss(model, batch, step)
            if not torch.isfinite(loss):
                raise NeurorayError(f"loss became {loss.item()} at step {step}; lower optim.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if optim.grad_clip:
                scalars["grad_norm"] = float(
                    torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
                )
            optimizer.step()
            scheduler.step()
            step += 1
            scalars.update(task.after_step(raw_model, step))
            scalars["loss"] = float(loss.detach())
            clock.stop()
            for key, value in scalars.items():
                sums[key] = sums.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1  # keys may appear on only some steps
            samples += _batch_size(batch)
            if run.fail_at_step is not None and step == run.fail_at_step:
                _inject_failure_once(run, step)

            if writer is not None and (step % run.preview_every == 0 or step == run.steps):
                for tag, image in task.previews(raw_model, batch, step).items():
                    writer.add_image(tag, image, step, dataformats="HWC")

            last = step == run.steps or clock.spent()
            save = step % run.checkpoint_every == 0 or last
            if save or step % run.report_every == 0:
                elapsed = time.perf_counter() - tick
                metrics = {k: v / counts[k] for k, v in sums.items()}
                metrics.update(
                    step=step,
                    lr=scheduler.get_last_lr()[0],
                    samples_per_s=samples * worker.world_size / max(elapsed, 1e-9),
                    trained_s=clock.trained_s,
                )
                if save and worker.is_chief:
                    metrics.update(task.validate(raw_model, step))
                if writer is not None:
                    for key, value in metrics.items():
                        if key != "step":
                            writer.add_scalar(f"train/{key}", value, step)
                    writer.flush()
                if save:
                    with tempfile.TemporaryDirectory() as tmp:
                        ckpt = None
                        if worker.is_chief:
                            save_checkpoint(
                                Path(tmp),
                                task=task,
                                model=raw_model,
                                optimizer=optimizer,
                                scheduler=scheduler,
                                step=step,
                                trained_s=clock.trained_s,
                            )
                            ckpt = Checkpoint.from_directory(tmp)
                        ray.train.report(metrics, checkpoint=ckpt)
                else:
                    ray.train.report(metrics)
                sums, counts, samples = {}, {}, 0
                tick = time.perf_counter()
    finally:
        if writer is not None:
            writer.close()


def _log_start(run: RunSettings, start_step: int) -> None:
    """Append where this (re)start began to ``<run dir>/starts.jsonl``: resumes are visible."""
    if is_remote(run.storage_path):
        return
    path = Path(run.run_dir()) / "starts.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"start_step": start_step, "time": time.time()}) + "\n")


def read_starts(run: RunSettings) -> list[int]:
    """The step each start of a local run began at (first entry 0; later ones are resumes)."""
    path = Path(run.run_dir()) / "starts.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["start_step"] for line in path.read_text().splitlines() if line]


def _batch_size(batch: dict[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    return 1


def _worker_entry(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    job = config["job_class"].model_validate_json(config["job"])
    if not job.run.ray_report_logs:
        silence_report_logs()  # the driver prints progress lines instead
    worker = WorkerInfo(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        device=ray.train.torch.get_device(),
        extras=config.get("extras", {}),
    )
    run_worker(config["task_class"](job, worker))


# ---------------------------------------------------------------------- the driver
def fit(
    task_class: type[TrainTask],
    job: TrainJob,
    *,
    extras: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
    progress: bool = True,
) -> Any:
    """Run ``task_class`` on a TorchTrainer; returns Ray's ``Result`` (``.checkpoint``, metrics).

    ``extras`` are driver-side objects the workers need (a ServerPool, actor handles). With
    ``progress`` the driver prints a line per report (``run.progress``, see
    :mod:`neuroray.trainers.progress`) and draws ``loss.png`` beside the checkpoints; a Tune
    trial passes False (Tune reports its trials itself).
    """
    run = job.run
    if run.checkpoint_every > run.steps:
        run = run.model_copy(update={"checkpoint_every": run.steps})
    if run.cpus_per_worker is None:
        run = run.model_copy(update={"cpus_per_worker": free_cpus_per_worker(run.num_workers)})
    job = job.model_copy(update={"run": run})
    record_run(job, task_class.__name__)  # a rerun resumes only the same training
    if not progress:
        return _fit_trainer(task_class, job, extras, list(callbacks or []))
    with DriverProgress(job) as shown:
        extra = [shown.callback] if shown.callback is not None else []
        return _fit_trainer(task_class, job, extras, [*(callbacks or []), *extra])


def _fit_trainer(
    task_class: type[TrainTask], job: TrainJob, extras: dict[str, Any] | None, callbacks: list[Any]
) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run = job.run
    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config={
            "task_class": task_class,
            "job_class": type(job),
            "job": job.model_dump_json(),
            "extras": extras or {},
        },
        scaling_config=ScalingConfig(
            num_workers=run.num_workers,
            use_gpu=run.use_gpu,
            resources_per_worker={
                "CPU": run.cpus_per_worker,
                **({"GPU": 1} if run.use_gpu else {}),
            },
        ),
        run_config=RunConfig(
            name=run.name,
            storage_path=absolute_storage(run.storage_path),
            checkpoint_config=CheckpointConfig(num_to_keep=run.keep_checkpoints),
            failure_config=FailureConfig(max_failures=run.max_failures),
            callbacks=callbacks or None,
        ),
    )
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    try:
        return trainer.fit()
    except Exception as err:
        cause = _user_error_in(err)
        if cause is not None:
            raise cause from None
        raise


def free_cpus_per_worker(num_workers: int) -> float:
    """The CPUs Ray has free now, shared among ``num_workers`` (at least 1 each, at most one
    node's worth): what ``run.cpus_per_worker: null`` reserves."""
    import ray

    free = ray.available_resources().get("CPU", 1.0)
    largest_node = max(
        (node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]), default=1.0
    )
    return float(max(1, min(math.floor(free / num_workers), math.floor(largest_node))))


def _user_error_in(err: BaseException) -> NeurorayError | None:
    """A NeurorayError raised inside a worker, unwrapped from Ray's exception chain."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, NeurorayError):
            return err
        nested = getattr(err, "cause", None) or getattr(err, "worker_failures", None)
        if isinstance(nested, dict):
            nested = next(iter(nested.values()), None)
        err = nested or err.__cause__ or err.__context__
    return None
