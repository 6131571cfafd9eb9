"""dbMiM's RL side: RLlib agents that learn where to mask, against a MIM model's reward.

- :mod:`~neuroray.agents.env`: ``MaskingEnv``, one agent per patch, one step per episode;
- :mod:`~neuroray.agents.module`: the shared per-patch actor-critic as an RLlib module;
- :mod:`~neuroray.agents.oracle`: ``MIMOracle``, observations and losses from the latest MIM weights;
- :mod:`~neuroray.agents.config`: ``DbMiMJob``, the job and its ``rl`` settings;
- :mod:`~neuroray.agents.ppo`: the RLlib PPO config over ``MaskingEnv``;
- :mod:`~neuroray.agents.runner`: ``RLRunner``, the RL loop as a Ray actor;
- :mod:`~neuroray.agents.diagnostics`: does the policy learn *where* (within-crop spread, rank
  correlations with held-out loss, gradient energy and position);
- :mod:`~neuroray.agents.policy_io`: RL checkpoints on disk and the ``policy.pt`` in them;
- :mod:`~neuroray.agents.dbmim`: the driver, ``run_dbmim`` (``neuroray pretrain dbmim``).

What the Ray Train side shares with them lives below this layer: the policy net and its
observations in :mod:`neuroray.models.policy`, the weight store and its payloads in
:mod:`neuroray.trainers.weights`, the Train task in :mod:`neuroray.trainers.dbmim`.

Importing this package registers the ``dbmim`` pretraining method
(:mod:`neuroray.trainers.methods`); submodules are imported on demand (RLlib is heavy).
"""

from __future__ import annotations

from neuroray.trainers.methods import register_method


@register_method("dbmim", help="dbMiM: RLlib multi-agent masking policy + MAE")
def _dbmim():  # noqa: ANN202 - (job class, run function), see register_method
    from neuroray.agents.dbmim import DbMiMJob, run_dbmim

    return DbMiMJob, run_dbmim
