"""Ray Tune sweeps over fine-tuning jobs: search spaces in YAML, ASHA, resume, best config out.

A sweep names a fine-tuning job (a :class:`~neuroray.trainers.finetune.FinetuneJob` YAML plus
overrides) and a search space of the job's dotted keys::

    job: configs/finetune_em.yaml
    search_space:
      optim.lr: {loguniform: [1.0e-5, 3.0e-3]}
      model.inflate: {choice: [center, average]}
      augment_strength: {uniform: [0.0, 1.5]}     # scales every augmentation's probability

**Train V2 pattern** (RAY_NOTES.md). Each trial is a *driver function* that builds its job and
runs the ordinary fine-tuning ``TorchTrainer`` (:func:`neuroray.trainers.loop.fit`) with a
``TuneReportCallback``. Train V2 reserves its workers in placement groups Tune does not see, so the
driver holds no CPU (:data:`~neuroray.tuning.resources.DRIVER_RESOURCES`) and ``max_concurrent_trials`` is
sized from ``ray.cluster_resources()`` and what one trial's workers need; otherwise trials starve
each other of workers and deadlock. The Tune controller itself runs in a zero-CPU task on the
driver's node that names the cluster in ``RAY_ADDRESS`` (see :func:`~neuroray.tuning.resources.tuner_task_options`).

**Early stopping.** ASHA on a validation metric (``val_voi``, min, for EM; ``val_dice``, max, for
mitochondria and LM) with ``step`` as its clock. The loop validates at checkpoints only, so Tune is
sent only the reports that carry the metric (:class:`ValidationReportCallback`); ASHA's rungs are
therefore judged at the first validation at or after each rung's step.

**Chunk servers.** Trials of one sweep read the same image and label layers, so the sweep driver
starts one :class:`~neuroray.platform.server.ServerPool` and hands it to every trial: one set of
decoded-chunk caches stays warm across trials, and no trial pays for starting servers. The servers
only read, so trials cannot disturb each other except by load. When the search space changes what
the pool serves (``data.image``, ``data.num_servers``, ``data.cache_mb``...), each trial starts its
own pool instead.

**Where things go** (``<exp>`` = ``<storage_path>/<name>``, local or ``s3://`` / ``gs://``)::

    <exp>/trial_<id>/             Tune's per-trial results (result.json, progress.csv, and
                                  TensorBoard events when tensorboardX is installed)
    <exp>/train/<id>/             each trial's Ray Train run: checkpoints, starts.jsonl and the
                                  loop's TensorBoard (scalars and previews)
    <exp>/best_job.yaml           the best trial's job: `neuroray finetune <task> <exp>/best_job.yaml`
    <exp>/summary.json            every trial's parameters, status, last step and metric

**Resume.** Rerunning the same sweep (same ``name`` and ``storage_path``) restores it with
``Tuner.restore``: finished trials are kept, unfinished and errored ones continue, and because a
trial's Train run name is its trial id, a continued trial resumes from its last checkpoint (the
search space and scheduler are those stored with the sweep; edits to them need a new name). A
trial whose worker dies is recovered by Ray Train inside the trial (``run.max_failures``); a trial
whose driver dies is retried by Tune (``max_trial_failures``) and also resumes from its checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from neuroray.config import RaySettings, StrictModel, dump_yaml, load_config
from neuroray.config import validate as validate_config
from neuroray.errors import ConfigError
from neuroray.paths import InputPath, OutputPath, RunName, is_remote
from neuroray.segmentation.tasks import get_task
from neuroray.trainers.finetune import FinetuneJob
from neuroray.trainers.loop import read_starts
from neuroray.trainers.settings import absolute_storage
from neuroray.tuning.report import SweepError, SweepResult, TrialSummary, pick_best
from neuroray.tuning.resources import (
    DRIVER_RESOURCES,
    TRIAL_CPUS_PER_WORKER,
    concurrent_trials,
    trial_resources,
    tuner_task_options,
)
from neuroray.tuning.space import (
    apply_params,
    build_param_space,
    domain_entry,
    example_values,
    job_overrides,
)

POOL_KEYS = (
    "data.image",
    "data.labels",
    "data.num_servers",
    "data.cache_mb",
    "data.server_cpus",
    "data.server_resources",
    "data.preload",
)
"""Job keys that change what the chunk servers serve: sweeping one gives each trial its own pool."""


# ---------------------------------------------------------------------- the sweep config
class SchedulerSettings(StrictModel):
    """Early stopping. ``asha``: asynchronous successive halving; ``fifo``: every trial runs out."""

    name: Literal["asha", "fifo"] = "asha"
    grace_period: int | None = Field(None, ge=1)
    """Steps before a trial can be stopped; default: the job's run.checkpoint_every (the first
    validation)."""
    reduction_factor: float = Field(2.0, gt=1)
    brackets: int = Field(1, ge=1)


class SweepJob(StrictModel):
    """A hyperparameter sweep over one fine-tuning job."""

    name: RunName = "sweep"
    job: InputPath
    """Path to a FinetuneJob YAML (relative to the working directory)."""
    overrides: dict[str, Any] = {}
    """Job keys set before sampling, nested (``run: {steps: 400}``) or dotted (``run.steps: 400``);
    on the command line: ``overrides.run.steps=400``."""
    search_space: dict[str, Any] = {}
    """Dotted job keys (or ``augment_strength``) -> a value or ``{kind: [args]}``; kinds:
    uniform, loguniform, quniform, qloguniform, randint, lograndint, choice, grid."""
    metric: str | None = None
    """Default: val_voi (em), val_dice (mito, lm)."""
    mode: Literal["min", "max"] | None = None
    num_samples: int = Field(8, ge=1)
    """Trials drawn (times the size of any grid)."""
    search: Literal["random", "optuna"] = "random"
    """random: Tune's BasicVariantGenerator (seeded); optuna: TPE, when optuna is installed."""
    seed: int | None = 0
    scheduler: SchedulerSettings = SchedulerSettings()
    max_concurrent_trials: int | None = Field(None, ge=1)
    """Default: as many trials as the cluster's CPUs / GPUs hold right now (on an autoscaling
    cluster, set it to what the cluster may grow to)."""
    max_trial_failures: int = Field(1, ge=0)
    """Tune retries of a trial whose driver fails (worker failures are handled inside)."""
    storage_path: OutputPath = Field("runs", validate_default=True)
    resume: bool = True
    """Continue an interrupted sweep with the same name and storage_path (else refuse to clobber)."""
    share_pool: bool = True
    """One ServerPool for all trials (ignored when the search space changes what it serves)."""
    best_config: OutputPath | None = None
    """Where to write the best job YAML; default <storage_path>/<name>/best_job.yaml (local),
    ./<name>_best_job.yaml (remote storage)."""
    ray: RaySettings = RaySettings()

    def experiment_path(self) -> str:
        return f"{absolute_storage(self.storage_path)}/{self.name}"

    def best_config_path(self) -> Path:
        if self.best_config:
            return Path(self.best_config)
        if is_remote(self.storage_path):
            return Path(f"{self.name}_best_job.yaml")
        return Path(self.experiment_path()) / "best_job.yaml"

    def summary_path(self) -> Path:
        """Every trial's parameters and results, as JSON, next to the best job."""
        best = self.best_config_path()
        if best == Path(self.experiment_path()) / "best_job.yaml":
            return best.with_name("summary.json")
        return best.with_name(f"{self.name}_summary.json")


# ---------------------------------------------------------------------- the prepared sweep
@dataclass
class PreparedSweep:
    """A sweep with its job loaded and everything checked, before any trial starts."""

    config: SweepJob
    job: FinetuneJob
    metric: str
    mode: Literal["min", "max"]
    shares_pool: bool

    @property
    def job_data(self) -> dict[str, Any]:
        return self.job.model_dump(mode="json")


def prepare_sweep(config: SweepJob) -> PreparedSweep:
    """Load the job, pick the metric, and validate every search-space key against the job."""
    job = load_config(FinetuneJob, config.job, job_overrides(config.overrides))
    task = get_task(job.task)
    metrics = task.validation_metrics
    metric = config.metric or task.default_metric
    if metric not in metrics:
        raise ConfigError(
            f"metric {metric!r} is not reported by a {job.task} job; use one of {sorted(metrics)}"
        )
    mode = config.mode or metrics[metric]
    if job.validation.roi is None:
        raise ConfigError(
            f"the sweep ranks trials by {metric}, but job {config.job} has no validation.roi; "
            "set validation.roi to a held-out region of the training layers"
        )
    data = job.model_dump(mode="json")
    for key, values in example_values(config.search_space).items():
        for value in values:
            try:
                validate_config(FinetuneJob, apply_params(data, {key: value}), config.job)
            except ConfigError as err:
                raise ConfigError(f"search_space.{key}={value!r}: {err}") from None
    if config.scheduler.grace_period and config.scheduler.grace_period > job.run.steps:
        raise ConfigError(
            f"scheduler.grace_period {config.scheduler.grace_period} exceeds the job's "
            f"run.steps {job.run.steps}"
        )
    if config.search == "optuna" and not _installed("optuna"):
        raise ConfigError(
            "search: optuna needs the optuna package (pip install optuna); or use search: random"
        )
    if config.search == "optuna" and any(
        (domain_entry(k, v) or ("",))[0] == "grid" for k, v in config.search_space.items()
    ):
        raise ConfigError("search: optuna cannot sample grid domains; use choice instead")
    config = config.model_copy(update={"search_space": _absolute_paths_in(config, data)})
    shares_pool = config.share_pool and not any(
        key == pool_key or key.startswith(pool_key + ".")
        for key in config.search_space
        for pool_key in POOL_KEYS
    )
    return PreparedSweep(config, job, metric, mode, shares_pool)


def _absolute_paths_in(config: SweepJob, data: dict[str, Any]) -> dict[str, Any]:
    """The search space with local paths among its values made absolute here, in the driver:
    trials build their jobs inside Tune's workers, whose working directory is not the user's."""

    def resolved(key: str, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        job = validate_config(FinetuneJob, apply_params(data, {key: value}), config.job)
        node: Any = job.model_dump(mode="json")
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return value
            node = node[part]
        return node

    space: dict[str, Any] = {}
    for key, spec in config.search_space.items():
        entry = domain_entry(key, spec)
        if entry is None:
            space[key] = resolved(key, spec)
        elif entry[0] in ("choice", "grid"):
            space[key] = {entry[0]: [resolved(key, value) for value in entry[1]]}
        else:
            space[key] = spec
    return space


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def trial_job(
    sweep: PreparedSweep, params: Mapping[str, Any], trial_id: str, *, for_trial: bool = True
) -> FinetuneJob:
    """The job one trial runs (its own Train run under the experiment), or, with
    ``for_trial=False``, the ready-to-run job for the user (their storage, no fault injection)."""
    data = apply_params(sweep.job_data, params)
    if for_trial:  # its own run folder, so checkpoints and TensorBoard events never collide
        data["run"].update(
            name=trial_id,
            storage_path=f"{sweep.config.experiment_path()}/train",
            tensorboard_dir=None,
            cpus_per_worker=data["run"].get("cpus_per_worker") or TRIAL_CPUS_PER_WORKER,
        )
    else:
        data["run"].update(name=f"{sweep.config.name}-best", fail_at_step=None)
    return validate_config(FinetuneJob, data, f"trial {trial_id}")


# ---------------------------------------------------------------------- Tune plumbing
def _report_callback(metric: str):
    """A TuneReportCallback that forwards only reports carrying ``metric`` (validations)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ValidationReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):  # noqa: ANN001 - Ray's API
            if metrics and metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return ValidationReportCallback()


def run_trial(
    params: dict[str, Any], *, sweep: PreparedSweep | None = None, pool: Any = None
) -> None:
    """The Tune trainable: one trial's fine-tuning TorchTrainer (a driver function, 0 CPUs)."""
    import ray.tune

    from neuroray.trainers.data import chunk_servers
    from neuroray.trainers.finetune import SegmentationTask
    from neuroray.trainers.loop import fit

    if sweep is None:
        raise TypeError("run_trial needs its sweep: bind it with tune.with_parameters(sweep=...)")
    job = trial_job(sweep, params, ray.tune.get_context().get_trial_id())
    # the sweep's shared pool, or this trial's own (stopped when the trial ends)
    with contextlib.nullcontext(pool) if pool is not None else chunk_servers(job.data) as pool:
        fit(
            SegmentationTask,
            job,
            extras={"pool": pool},
            callbacks=[_report_callback(sweep.metric)],
            progress=False,  # Tune reports its trials
        )


def _trial_dirname(trial) -> str:  # noqa: ANN001 - a Tune Trial
    return f"trial_{trial.trial_id}"


def _searcher(sweep: PreparedSweep, max_concurrent: int):
    """The search algorithm, limited to ``max_concurrent`` trials at once.

    (Tune ignores ``TuneConfig.max_concurrent_trials`` when handed a BasicVariantGenerator, so
    the limit goes into the generator itself; Optuna is wrapped in a ConcurrencyLimiter.)
    """
    from ray.tune.search import ConcurrencyLimiter

    config = sweep.config
    if config.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise ConfigError(
                "search: optuna needs the optuna package (pip install optuna); "
                "or use search: random"
            ) from None
        return ConcurrencyLimiter(
            OptunaSearch(metric=sweep.metric, mode=sweep.mode, seed=config.seed), max_concurrent
        )
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=config.seed, max_concurrent=max_concurrent)


def _scheduler(sweep: PreparedSweep):
    settings = sweep.config.scheduler
    if settings.name == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="step",
        max_t=sweep.job.run.steps,
        grace_period=settings.grace_period
        or min(sweep.job.run.checkpoint_every, sweep.job.run.steps),
        reduction_factor=settings.reduction_factor,
        brackets=settings.brackets,
    )


def _summarise(sweep: PreparedSweep, results) -> list[TrialSummary]:  # noqa: ANN001 - ResultGrid
    trials = []
    steps = sweep.job.run.steps
    # Result objects carry no status; the analysis behind the grid lists trials in the same order.
    analysis = getattr(results, "_experiment_analysis", None)
    statuses = [t.status for t in analysis.trials] if analysis else [None] * len(results)
    for result, status in zip(results, statuses, strict=True):
        metrics = result.metrics or {}
        trial_id = str(metrics.get("trial_id") or Path(result.path).name.removeprefix("trial_"))
        params = {k: v for k, v in (result.config or {}).items()}
        value = metrics.get(sweep.metric)
        last_step = metrics.get("step")
        error = None if result.error is None else str(result.error).splitlines()[0][:200]
        starts: list[int] = []
        if not is_remote(sweep.config.storage_path):
            starts = read_starts(trial_job(sweep, params, trial_id).run)
        status = "ERROR" if error else (status or "TERMINATED")
        trials.append(
            TrialSummary(
                trial_id=trial_id,
                params=params,
                status=status,
                last_step=None if last_step is None else int(last_step),
                value=None if value is None or not math.isfinite(value) else float(value),
                stopped_early=status == "TERMINATED"
                and last_step is not None
                and last_step < steps,
                error=error,
                starts=starts,
            )
        )
    return sorted(trials, key=lambda t: t.trial_id)


# ---------------------------------------------------------------------- the driver
def _run_tuner(
    sweep: PreparedSweep, pool: Any, restoring: bool, max_concurrent: int
) -> list[TrialSummary]:
    """Build (or restore) the Tuner, run every trial, and summarise them."""
    from ray import tune

    config = sweep.config
    experiment = config.experiment_path()
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, sweep=sweep, pool=pool), DRIVER_RESOURCES
    )
    if restoring:
        tuner = tune.Tuner.restore(
            experiment, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=build_param_space(config.search_space),
            tune_config=tune.TuneConfig(
                metric=sweep.metric,
                mode=sweep.mode,
                search_alg=_searcher(sweep, max_concurrent),
                scheduler=_scheduler(sweep),
                num_samples=config.num_samples,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=config.name,
                storage_path=absolute_storage(config.storage_path),
                failure_config=tune.FailureConfig(max_failures=config.max_trial_failures),
            ),
        )
    return _summarise(sweep, tuner.fit())


def tune_sweep(config: SweepJob) -> SweepResult:
    """Run (or resume) a sweep and write the best trial's job as a ready-to-run YAML."""
    import ray
    from ray import tune

    from neuroray.runtime import connect_to
    from neuroray.trainers.data import chunk_servers

    sweep = prepare_sweep(config)
    experiment = config.experiment_path()
    restoring = config.resume and tune.Tuner.can_restore(experiment)
    if not restoring and not is_remote(config.storage_path) and Path(experiment).exists():
        if any(Path(experiment).iterdir()):
            raise SweepError(
                f"{experiment} already holds files but no sweep Tune can restore; choose another "
                "name or storage_path, or delete the folder"
            )
    if not config.resume and tune.Tuner.can_restore(experiment):
        raise SweepError(
            f"sweep {config.name} already exists at {experiment}; set resume=true to continue it, "
            "or choose another name"
        )

    cluster = connect_to(config.ray)
    per_trial = trial_resources(sweep.job, own_pool=not sweep.shares_pool)
    reserved = {"CPU": sweep.job.data.num_servers * sweep.job.data.server_cpus}
    max_concurrent = config.max_concurrent_trials or concurrent_trials(
        cluster, per_trial, reserved if sweep.shares_pool else {}
    )

    # one pool for every trial when they share it (else each trial starts its own: run_trial)
    with chunk_servers(sweep.job.data) if sweep.shares_pool else contextlib.nullcontext() as pool:
        tuner_task = ray.remote(_run_tuner).options(**tuner_task_options())
        running = tuner_task.remote(sweep, pool, restoring, max_concurrent)
        try:
            trials = ray.get(running)
        except KeyboardInterrupt:  # Tune saves its state on interrupt: rerun to resume
            ray.cancel(running)
            raise

    best = pick_best(trials, sweep.mode)
    best_path = config.best_config_path()
    best_path.parent.mkdir(parents=True, exist_ok=True)
    dump_yaml(trial_job(sweep, best.params, best.trial_id, for_trial=False), best_path)
    result = SweepResult(
        name=config.name,
        experiment_path=experiment,
        metric=sweep.metric,
        mode=sweep.mode,
        trials=trials,
        best=best,
        best_config=best_path,
        max_concurrent_trials=max_concurrent,
    )
    summary = {
        "experiment": experiment,
        "metric": sweep.metric,
        "mode": sweep.mode,
        "max_concurrent_trials": max_concurrent,
        "best": best.trial_id,
        "best_config": str(best_path),
        "trials": [t.__dict__ for t in trials],
    }
    config.summary_path().write_text(json.dumps(summary, indent=1, default=str))
    return result


JOB_CLASS = SweepJob


def run_job(config: SweepJob) -> SweepResult:
    """The CLI's entry point (``neuroray tune CONFIG [key=value ...]``)."""
    return tune_sweep(config)
