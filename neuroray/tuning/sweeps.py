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
driver holds no CPU (:data:`DRIVER_RESOURCES`) and ``max_concurrent_trials`` is
sized from ``ray.cluster_resources()`` and what one trial's workers need; otherwise trials starve
each other of workers and deadlock. The Tune controller itself runs in a zero-CPU task on the
driver's node that names the cluster in ``RAY_ADDRESS`` (see :func:`_tuner_task_options`).

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

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from neuroray.config import RayConfig, StrictModel, apply_overrides, dump_yaml, load_config
from neuroray.config import validate as validate_config
from neuroray.errors import ConfigError, NeurorayError
from neuroray.paths import InputPath, OutputPath, RunName
from neuroray.platform.augment import build_pipeline
from neuroray.registry import Registry
from neuroray.segmentation.tasks import get_task
from neuroray.trainers.finetune import FinetuneJob
from neuroray.trainers.loop import absolute_storage, is_remote, read_starts

AUGMENT_STRENGTH = "augment_strength"
"""A search-space key that is not a job key: it scales the probability ``p`` of every transform
in ``data.augment`` (capped at 1); 0 turns augmentation off."""

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


DRIVER_RESOURCES = {"cpu": 0, "memory": 256 * 2**20}
"""What a trial's driver function reserves: no CPU (Train V2 reserves its workers' CPUs in its own
placement groups; a driver holding one would starve them), but not nothing either: Tune rejects
an all-zero request, so the driver books the memory its Python process roughly uses."""


class SweepError(NeurorayError):
    """A sweep cannot start or finish (its experiment folder clashes, no trial produced a metric)."""


# ---------------------------------------------------------------------- search space
@dataclass(frozen=True)
class DomainKind:
    """How one ``{kind: args}`` entry of a search space becomes a Tune domain.

    ``examples`` lists values checked against the job before any trial starts, so a wrong key
    or type fails at once and names the key.
    """

    build: Callable[[list[Any]], Any]
    examples: Callable[[list[Any]], list[Any]]
    arity: int | None = None  # fixed number of arguments, None = a non-empty list of values


DOMAINS: Registry[DomainKind] = Registry("search domain")


def _tune():
    from ray import tune

    return tune


def _register(name: str, kind: DomainKind) -> None:
    DOMAINS.register(name)(kind)


_register("uniform", DomainKind(lambda a: _tune().uniform(*a), lambda a: list(a), 2))
_register("loguniform", DomainKind(lambda a: _tune().loguniform(*a), lambda a: list(a), 2))
_register("quniform", DomainKind(lambda a: _tune().quniform(*a), lambda a: a[:2], 3))
_register("qloguniform", DomainKind(lambda a: _tune().qloguniform(*a), lambda a: a[:2], 3))
_register("randint", DomainKind(lambda a: _tune().randint(*a), lambda a: [a[0], a[1] - 1], 2))
_register("lograndint", DomainKind(lambda a: _tune().lograndint(*a), lambda a: [a[0], a[1] - 1], 2))
_register("choice", DomainKind(lambda a: _tune().choice(list(a)), lambda a: list(a)))
_register("grid", DomainKind(lambda a: _tune().grid_search(list(a)), lambda a: list(a)))


def _domain_entry(key: str, spec: Any) -> tuple[str, list[Any]] | None:
    """``(kind, args)`` when ``spec`` is a one-key ``{kind: args}`` mapping naming a domain."""
    if not (isinstance(spec, Mapping) and len(spec) == 1):
        return None
    kind, args = next(iter(spec.items()))
    if kind not in DOMAINS:
        return None
    domain = DOMAINS.get(kind)
    if not isinstance(args, list) or not args:
        raise ConfigError(f"search_space.{key}: {kind} needs a list of arguments, got {args!r}")
    if domain.arity is not None and len(args) != domain.arity:
        raise ConfigError(
            f"search_space.{key}: {kind} takes {domain.arity} arguments, got {len(args)} ({args})"
        )
    if domain.arity is not None and not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in args
    ):
        raise ConfigError(f"search_space.{key}: {kind} arguments must be numbers, got {args}")
    if kind in ("uniform", "loguniform", "quniform", "qloguniform", "randint", "lograndint"):
        low, high = args[0], args[1]
        if not low < high or (kind.startswith(("log", "qlog")) and low <= 0):
            raise ConfigError(
                f"search_space.{key}: {kind} bounds {args[:2]} must satisfy 0 < low < high "
                "for log domains and low < high otherwise"
            )
    return kind, args


def build_param_space(search_space: Mapping[str, Any]) -> dict[str, Any]:
    """The Tune ``param_space`` of a YAML search space (fixed values pass through)."""
    space = {}
    for key, spec in search_space.items():
        entry = _domain_entry(key, spec)
        space[key] = spec if entry is None else DOMAINS.get(entry[0]).build(entry[1])
    return space


def example_values(search_space: Mapping[str, Any]) -> dict[str, list[Any]]:
    """For each key, the values checked against the job before the sweep starts."""
    examples = {}
    for key, spec in search_space.items():
        entry = _domain_entry(key, spec)
        examples[key] = [spec] if entry is None else DOMAINS.get(entry[0]).examples(entry[1])
    return examples


def scale_augmentation(augment: str | list[dict[str, Any]], strength: float) -> list[dict]:
    """``augment`` (a named list or specs) with every probability ``p`` scaled, capped at 1."""
    if strength < 0:
        raise ConfigError(f"{AUGMENT_STRENGTH} must be >= 0, got {strength}")
    if strength == 0 or not augment:
        return []
    specs = build_pipeline(augment).specs()
    for spec in specs:
        spec["p"] = min(1.0, float(spec.get("p", 1.0)) * strength)
    return specs


def job_overrides(overrides: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key.sub=value`` strings from a nested and/or dotted mapping of job keys."""
    lines = []
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            lines += job_overrides(value, f"{path}.")
        else:
            lines.append(f"{path}={json.dumps(value)}")
    return lines


def apply_params(job_data: dict[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """Job data (plain YAML data) with one trial's sampled parameters set."""
    overrides = [f"{k}={json.dumps(v)}" for k, v in params.items() if k != AUGMENT_STRENGTH]
    data = apply_overrides(job_data, overrides)
    if AUGMENT_STRENGTH in params:
        data.setdefault("data", {})
        data["data"]["augment"] = scale_augmentation(
            data["data"].get("augment", []), float(params[AUGMENT_STRENGTH])
        )
    return data


# ---------------------------------------------------------------------- the sweep config
class SchedulerSettings(StrictModel):
    """Early stopping. ``asha``: asynchronous successive halving; ``fifo``: every trial runs out."""

    name: Literal["asha", "fifo"] = "asha"
    grace_period: int | None = Field(None, ge=1)
    """Steps before a trial can be stopped; default: the job's run.checkpoint_every (the first
    validation)."""
    reduction_factor: float = Field(2.0, gt=1)
    brackets: int = Field(1, ge=1)


class SweepConfig(StrictModel):
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
    ray: RayConfig = RayConfig()

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

    config: SweepConfig
    job: FinetuneJob
    metric: str
    mode: Literal["min", "max"]
    shares_pool: bool

    @property
    def job_data(self) -> dict[str, Any]:
        return self.job.model_dump(mode="json")


def prepare_sweep(config: SweepConfig) -> PreparedSweep:
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
        (_domain_entry(k, v) or ("",))[0] == "grid" for k, v in config.search_space.items()
    ):
        raise ConfigError("search: optuna cannot sample grid domains; use choice instead")
    config = config.model_copy(update={"search_space": _absolute_paths_in(config, data)})
    shares_pool = config.share_pool and not any(
        key == pool_key or key.startswith(pool_key + ".")
        for key in config.search_space
        for pool_key in POOL_KEYS
    )
    return PreparedSweep(config, job, metric, mode, shares_pool)


def _absolute_paths_in(config: SweepConfig, data: dict[str, Any]) -> dict[str, Any]:
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
        entry = _domain_entry(key, spec)
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
        )
    else:
        data["run"].update(name=f"{sweep.config.name}-best", fail_at_step=None)
    return validate_config(FinetuneJob, data, f"trial {trial_id}")


def trial_resources(job: FinetuneJob, *, own_pool: bool) -> dict[str, float]:
    """CPUs and GPUs one trial's Train workers (and its own chunk servers) hold."""
    run = job.run
    cpus = run.num_workers * run.cpus_per_worker
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

    from neuroray.trainers.data import start_pool
    from neuroray.trainers.finetune import SegmentationTask
    from neuroray.trainers.loop import fit

    if sweep is None:
        raise TypeError("run_trial needs its sweep: bind it with tune.with_parameters(sweep=...)")
    job = trial_job(sweep, params, ray.tune.get_context().get_trial_id())
    own_pool = pool is None
    if own_pool:
        pool = start_pool(job.data)
    try:
        fit(
            SegmentationTask,
            job,
            extras={"pool": pool},
            callbacks=[_report_callback(sweep.metric)],
        )
    finally:
        if own_pool:
            pool.shutdown()


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


# ---------------------------------------------------------------------- results
@dataclass
class TrialSummary:
    trial_id: str
    params: dict[str, Any]
    status: str
    last_step: int | None
    value: float | None
    """The sweep metric at the trial's last validation."""
    stopped_early: bool
    error: str | None = None
    starts: list[int] = field(default_factory=list)
    """The step each start of its Train run began at ([0, s] = one recovery from step s)."""


@dataclass
class SweepResult:
    name: str
    experiment_path: str
    metric: str
    mode: str
    trials: list[TrialSummary]
    best: TrialSummary
    best_config: Path
    max_concurrent_trials: int

    def summary(self) -> str:
        lines = [
            f"sweep {self.name}: {len(self.trials)} trials, metric {self.metric} ({self.mode}), "
            f"up to {self.max_concurrent_trials} at once; experiment at {self.experiment_path}"
        ]
        for trial in self.trials:
            value = "-" if trial.value is None else f"{trial.value:.4f}"
            note = " stopped early" if trial.stopped_early else ""
            note += f" resumed at {trial.starts[1:]}" if len(trial.starts) > 1 else ""
            note += f" ERROR {trial.error}" if trial.error else ""
            lines.append(
                f"  {trial.trial_id}: {trial.status} step {trial.last_step} "
                f"{self.metric} {value}{note}  {json.dumps(trial.params)}"
            )
        lines.append(
            f"best: {self.best.trial_id} ({self.metric} {self.best.value:.4f}); ready-to-run "
            f"job: {self.best_config}"
        )
        return "\n".join(lines)


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


def pick_best(trials: list[TrialSummary], mode: str) -> TrialSummary:
    """ASHA's answer: among trials that got furthest, the best metric at their last validation."""
    scored = [t for t in trials if t.value is not None and t.last_step is not None]
    if not scored:
        raise SweepError("no trial reported its validation metric; see the trials' errors")
    furthest = max(t.last_step for t in scored)
    finalists = [t for t in scored if t.last_step == furthest]
    sign = 1.0 if mode == "min" else -1.0
    return min(finalists, key=lambda t: sign * t.value)


# ---------------------------------------------------------------------- the driver
def _tuner_task_options() -> dict[str, Any]:
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


def tune_sweep(config: SweepConfig) -> SweepResult:
    """Run (or resume) a sweep and write the best trial's job as a ready-to-run YAML."""
    import ray
    from ray import tune

    from neuroray.runtime import connect
    from neuroray.trainers.data import start_pool

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

    cluster = connect(
        config.ray.address, num_cpus=config.ray.num_cpus, object_store_mb=config.ray.object_store_mb
    )
    per_trial = trial_resources(sweep.job, own_pool=not sweep.shares_pool)
    reserved = {"CPU": sweep.job.data.num_servers * sweep.job.data.server_cpus}
    max_concurrent = config.max_concurrent_trials or concurrent_trials(
        cluster, per_trial, reserved if sweep.shares_pool else {}
    )

    pool = start_pool(sweep.job.data) if sweep.shares_pool else None
    try:
        tuner_task = ray.remote(_run_tuner).options(**_tuner_task_options())
        running = tuner_task.remote(sweep, pool, restoring, max_concurrent)
        try:
            trials = ray.get(running)
        except KeyboardInterrupt:  # Tune saves its state on interrupt: rerun to resume
            ray.cancel(running)
            raise
    finally:
        if pool is not None:
            pool.shutdown()

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


JOB_CLASS = SweepConfig


def run_job(config: SweepConfig) -> SweepResult:
    """The CLI's entry point (``neuroray tune CONFIG [key=value ...]``)."""
    return tune_sweep(config)
