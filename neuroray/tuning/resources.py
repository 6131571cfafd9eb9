"""How many trials of a sweep fit at once, and what each one's processes hold."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from neuroray.trainers.finetune import FinetuneJob

TRIAL_CPUS_PER_WORKER = 1.0
"""A trial's CPUs per worker where its job leaves ``run.cpus_per_worker`` to Ray's free CPUs:
trials run side by side, so one must not take the whole machine."""

DRIVER_RESOURCES = {"cpu": 0, "memory": 256 * 2**20}
"""What a trial's driver function reserves: no CPU (Train V2 reserves its workers' CPUs in its own
placement groups; a driver holding one would starve them), but not nothing either: Tune rejects
an all-zero request, so the driver books the memory its Python process roughly uses."""


def trial_resources(job: FinetuneJob, *, own_pool: bool) -> dict[str, float]:
    """CPUs and GPUs one trial's Train workers (and its own chunk servers) hold."""
    run = job.run
    cpus = run.num_workers * (run.cpus_per_worker or TRIAL_CPUS_PER_WORKER)
    if own_pool:
        cpus += job.data.num_servers * job.data.server_cpus
    return {"CPU": cpus, "GPU": float(run.num_workers if run.use_gpu else 0)}


def concurrent_trials(
    cluster: Mapping[str, float], per_trial: Mapping[str, float], reserved: Mapping[str, float]
) -> int:
    """How many trials fit in ``cluster`` after ``reserved`` (at least 1)."""
    fits = [
        math.floor((cluster.get(name, 0.0) - reserved.get(name, 0.0)) / need + 1e-9)
        for name, need in per_trial.items()
        if need > 0
    ]
    return max(1, min(fits)) if fits else 1


def tuner_task_options() -> dict[str, Any]:
    """Where the Tune controller runs: a zero-CPU task on this node whose processes (and so the
    trials, their Train controllers and Train's placement-group cleaners) carry RAY_ADDRESS.

    Train V2's cleaner finds the cluster by auto-detection; on a machine running more than one
    Ray (a shared workstation, CI) that fails, the placement group of a trial ASHA stopped is
    never released and later trials wait for CPUs forever. Naming the cluster fixes it.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    context = ray.get_runtime_context()
    return {
        "num_cpus": 0,
        "max_retries": 0,
        "runtime_env": {"env_vars": {"RAY_ADDRESS": context.gcs_address}},
        # local storage paths and the driver's view of the files stay valid
        "scheduling_strategy": NodeAffinitySchedulingStrategy(context.get_node_id(), soft=False),
    }
