"""dbMiM: an RLlib masking policy and a Ray Train MIM model, trained side by side.

``neuroray pretrain dbmim configs/pretrain_dbmim.yaml`` runs :func:`run_dbmim`, which starts:

- the chunk servers (one :class:`~neuroray.platform.server.ServerPool`, read by both sides);
- a :class:`~neuroray.trainers.weights.WeightStore` actor (no CPU) that carries weights both ways;
- a :class:`~neuroray.agents.oracle.MIMOracle` actor: the latest MIM weights, scoring batches of
  crops for the agents (``rl.oracle``: CPU, or a GPU fraction);
- an :class:`~neuroray.agents.runner.RLRunner` actor holding ``rl.cpus`` CPUs: RLlib PPO over
  :class:`~neuroray.agents.env.MaskingEnv` with one shared
  :class:`~neuroray.agents.module.PatchPolicyModule` (``num_env_runners=0``: it samples in its own
  process, the fastest layout on a few cores); it publishes the policy after every iteration;
- then the MIM run itself: :func:`~neuroray.trainers.loop.fit` with
  :class:`~neuroray.trainers.dbmim.DbMiMTask`, an MAE task whose rank 0 publishes the MAE weights
  every ``rl.publish_mim_every`` steps (and at every lock-step turn) and whose workers mask by the
  game's rule from the newest policy (random masking of the same K until the first policy
  arrives).

**The game** (:mod:`neuroray.agents.env`): by default every crop masks exactly
K = round(``masking.ratio`` * N) patches on both sides; the agents nominate patches, round(alpha_t
* K) of the K are drawn from the nominees and the rest at random (alpha_t: ``rl.env.alpha``, 0 ->
0.5 over ``run.steps``); each masked patch is rewarded by its loss (on a target with a noise
floor, ``rl.oracle``) rank-centred within its crop, a reward that sums to zero and so pays only
for *where*. ``rl.env.reward.kind=emergent`` plays the original emergent-ratio game instead (it
collapses to "mask more"; kept to show it). **Lock-step cadence** ``rl.steps_per_policy`` (10 by
default) keeps the policy within a few trainer steps of the MIM model it is rewarded by.

Why an actor for the RL loop: the driver is blocked in ``fit`` and holds no CPU, while an actor
gets its own process, a CPU reservation Ray accounts for (on 2 cores: one for the trainer, one
for the RL side), its own torch thread count, and on a cluster any node with room. When the MIM
run ends the driver stops the RL loop, which writes a final checkpoint.

**Checkpoints and resume.** The MIM side checkpoints through the shared loop
(``<run dir>/checkpoint_*``, kind ``"dbmim"``). The RL side writes
``<run dir>/rl/checkpoint_<iteration>/`` (``algo.save_to_path``, plus ``rl_state.json`` and
``policy.pt``: the policy net alone, loadable with
:func:`~neuroray.agents.policy_io.load_policy`) every ``rl.checkpoint_every`` iterations and at
the end. Rerunning with the same ``run.name`` resumes
both: the trainer from its checkpoint, the RL loop from its newest one (it republishes the restored
policy at once). With a remote ``run.storage_path`` the RL checkpoints stay local
(``runs/<name>/rl``), so resume the RL side on the same machine.

**TensorBoard** (``<run dir>/tensorboard``): ``train/*`` from the MIM loop (losses, mask ratio,
``policy_version``, ``policy_mask_prob``, ``policy_prob_sd``, ``policy_entropy``, ``alpha``,
``mask_from_nominations``, ``policy_lag_steps``, and what the coupling costs the trainer per step:
``policy_ms``, ``publish_ms``) and ``pretrain/mask_probability`` (a slice | the policy's per-patch
nomination probability | the mask); ``rl/*`` from the RL loop (``reward_mean``, ``team_loss``,
``mask_ratio``, ``chosen_ratio``, ``from_nominations``, ``nominee_rank``, ``alpha``,
``mim_lag_steps``, ``entropy``, ``policy_loss``, ``vf_loss``, ``decisions_per_s``,
``crops_per_s``), ``rl/mask_probability`` on a fixed probe crop, and the placement diagnostics
``rl/diag_*`` on the probe crops (:mod:`neuroray.agents.diagnostics`: within-crop sd of the
nomination probability, its Spearman correlation with held-out per-patch loss, gradient energy
and position); the final policy's diagnostics are also in the result's metrics.

**The controls**, at the same K per crop and the same alpha_t schedule: ``masking.name=random``
runs the same job as plain MAE with random masking and no RL side (same data, model, steps and
batch size); ``masking.name=heuristic`` nominates each crop's patches of highest gradient energy
(:class:`~neuroray.masking.HeuristicMasker`, no RL side); ``masking.invert=true`` runs the whole
dbMiM job but the trainer nominates by 1 - p, the patches the policy ranks lowest.

**Where each piece lives.** This module is the orchestration only: :mod:`neuroray.agents.config`
(the job and its ``rl`` settings), :mod:`neuroray.agents.runner` (the RL loop actor),
:mod:`neuroray.agents.ppo` (the RLlib algorithm config), :mod:`neuroray.agents.policy_io` (RL
checkpoints and ``policy.pt``), :mod:`neuroray.trainers.dbmim` (the Ray Train task, beside the
other pretraining tasks), :mod:`neuroray.trainers.weights` (the weight store and its payloads),
:mod:`neuroray.models.policy` (the policy net and its observations, plain torch).
"""

from __future__ import annotations

import logging
from typing import Any

from neuroray.agents.config import DbMiMJob
from neuroray.agents.runner import start_rl_runner
from neuroray.trainers.dbmim import DbMiMError, DbMiMTask
from neuroray.trainers.loop import TrainTask
from neuroray.trainers.pretrain import MAETask, pretrain

__all__ = ["DbMiMError", "DbMiMJob", "DbMiMTask", "run_dbmim"]

log = logging.getLogger(__name__)


def run_dbmim(job: DbMiMJob, task_class: type[TrainTask] = DbMiMTask) -> Any:
    """Run a dbMiM job (or its random-masking control); returns the MIM run's Ray Result.

    The RL side's summary (iterations, decisions/s, crops/s, last reward / entropy / ratio, its
    checkpoint) is added to ``result.metrics`` under ``rl/``.
    """
    if not job.uses_policy:
        log.info("masking is %r: running the control without the RL side", job.masking.name)
        return pretrain(job, task_class if job.uses_content else MAETask)

    import ray

    from neuroray.agents.oracle import start_oracle
    from neuroray.trainers.curves import write_curves
    from neuroray.trainers.data import chunk_servers
    from neuroray.trainers.loop import fit
    from neuroray.trainers.weights import start_weight_store

    actors: list[Any] = []
    with chunk_servers(job.data, job.ray) as pool:
        try:
            store = start_weight_store()
            oracle = start_oracle(
                job.model, job.rl.oracle, seed=job.run.seed, store=store, pin_cpus=job.rl.pin_cpus
            )
            actors += [store, oracle]
            runner = start_rl_runner(job, pool, store, oracle)
            actors.append(runner)
            rl_run = runner.run.remote()
            try:
                result = fit(task_class, job, extras={"pool": pool, "store": store})
            finally:
                runner.stop.remote()
            try:
                summary = ray.get(rl_run)
            except ray.exceptions.RayError as err:
                raise DbMiMError(
                    f"the MIM run finished (checkpoint {result.checkpoint}) but the RL side failed: "
                    f"{err}; rerun with the same run.name to resume both sides"
                ) from err
            result.metrics.update({f"rl/{k}": v for k, v in summary.items()})
            write_curves(job)  # again, with the RL side's last iterations (reward, entropy)
            return result
        finally:
            for actor in actors:
                ray.kill(actor)
