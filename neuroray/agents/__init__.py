"""dbMiM's RL side: RLlib agents that learn where to mask, against a MIM model's reward.

- :mod:`~neuroray.agents.env`: ``MaskingEnv``, one agent per patch, one step per episode;
- :mod:`~neuroray.agents.module`: the shared per-patch actor-critic (``PatchPolicyModule``);
- :mod:`~neuroray.agents.oracle`: ``MIMOracle``, observations and losses from the latest MIM weights;
- :mod:`~neuroray.agents.weights`: ``WeightStore``, weights carried between trainer and RL side;
- :mod:`~neuroray.agents.dbmim`: the job, the trainer task and the driver (``neuroray pretrain dbmim``).

Submodules are imported on demand (RLlib is heavy).
"""
