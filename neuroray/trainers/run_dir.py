"""What a training run folder was made by, so that a rerun resumes only the same training.

Rerunning a job with the same ``run.name`` resumes from its latest checkpoint. That is right
when only *how* it runs changed (more steps, a longer time budget, other logging, more chunk
servers, fault-injection drills) and wrong when *what* it trains changed (model, data, crops,
targets, optimiser): the checkpoint would be passed off as the new job's result. Each local run
folder keeps ``.neuroray/fingerprint.json`` (the job without its operational keys), and a rerun
whose fingerprint differs is refused before any work starts, naming the keys that differ.
"""

from __future__ import annotations

from typing import Any

from neuroray.paths import is_remote
from neuroray.platform.provenance import check_resume, local_dir, write_fingerprint
from neuroray.trainers.settings import TrainJob

#: Keys a resumed run may change: how long and how it runs, not what it learns.
OPERATIONAL_KEYS: dict[str, frozenset[str]] = {
    "run": frozenset({
        "name", "storage_path", "steps", "time_budget_s", "checkpoint_every", "report_every",
        "preview_every", "keep_checkpoints", "max_failures", "tensorboard_dir", "fail_at_step",
        "fail_mode", "cpus_per_worker", "num_workers", "use_gpu", "amp", "progress",
        "ray_report_logs",
    }),  # fmt: skip
    "data": frozenset({
        "num_servers", "cache_mb", "server_cpus", "server_resources", "preload",
        "crops_per_request", "prefetch",
    }),  # fmt: skip
    "ray": frozenset({"*"}),
    "validation": frozenset({"*"}),
}


def run_fingerprint(job: TrainJob, kind: str) -> dict[str, Any]:
    """The job as plain data without its operational keys, and the kind of training."""
    data = job.model_dump(mode="json")
    for section, keys in OPERATIONAL_KEYS.items():
        value = data.get(section)
        if not isinstance(value, dict):
            continue
        if "*" in keys:
            data.pop(section)
        else:
            data[section] = {k: v for k, v in value.items() if k not in keys}
    return {"kind": kind, "job": data}


def check_run_resume(job: TrainJob, kind: str) -> None:
    """Refuse (a VolumeError naming what differs) a rerun into a local run folder that was made
    by a different training; nothing is written."""
    if is_remote(job.run.storage_path):
        return
    check_resume(
        local_dir(job.run.run_dir()),
        run_fingerprint(job, kind),
        what=f"run {job.run.run_dir()}",
        overwrite_hint="choose another run.name (or delete the folder)",
    )


def record_run(job: TrainJob, kind: str) -> None:
    """Check, then keep, the fingerprint of the training this local run folder holds."""
    if is_remote(job.run.storage_path):
        return
    check_run_resume(job, kind)
    write_fingerprint(local_dir(job.run.run_dir()), run_fingerprint(job, kind))
