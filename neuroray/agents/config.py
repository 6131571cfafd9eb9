"""The dbMiM job: an MAE pretraining job plus the RL side's settings (env, policy, PPO, oracle,
resources, lock-step cadence)."""

from __future__ import annotations

from pydantic import Field, model_validator

from neuroray.agents.env import EnvSettings
from neuroray.agents.oracle import OracleSettings
from neuroray.config import StrictModel
from neuroray.masking import MaskerSpec, PolicyMasker
from neuroray.models.policy import PolicyConfig
from neuroray.trainers.pretrain import MAEJob


class PPOSettings(StrictModel):
    """PPO on the new API stack; batch sizes count agent steps (= patch decisions).

    One iteration of 1,024 decisions takes about as long as ``rl.steps_per_policy`` = 10 trainer
    steps on a CPU laptop (RL ~1,000 decisions/s, a trainer step 100-120 ms; benchmarks/
    RESULTS.md), so in lock step neither side waits long for the other.
    """

    lr: float = Field(3e-4, gt=0)
    train_batch_agent_steps: int = Field(1024, ge=1)
    minibatch_size: int = Field(256, ge=1)
    num_epochs: int = Field(4, ge=1)
    entropy_coeff: float = Field(0.01, ge=0)
    clip_param: float = Field(0.2, gt=0)
    vf_loss_coeff: float = Field(0.5, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)


class RLSettings(StrictModel):
    """The RL side of dbMiM: env, policy, PPO, oracle, resources and exchange cadence."""

    env: EnvSettings = EnvSettings()
    policy: PolicyConfig = PolicyConfig()
    ppo: PPOSettings = PPOSettings()
    oracle: OracleSettings = OracleSettings()
    cpus: float = Field(1.0, gt=0)
    """CPUs reserved for the RL actor (RLlib sampling and learning run in it)."""
    pin_cpus: list[int] | None = None
    """Pin the RL actor and the oracle to these cores (Linux), e.g. to keep them off the
    trainer's core on one machine; None leaves placement to the OS."""
    publish_mim_every: int = Field(10, ge=1)
    """Trainer steps between MIM weight publications (the oracle picks them up)."""
    checkpoint_every: int = Field(10, ge=1)
    """RL iterations between RL checkpoints (one is also written when the run ends)."""
    preview_every: int = Field(10, ge=1)
    """RL iterations between probe previews and placement diagnostics (``rl/diag_*``)."""
    probe_crops: int = Field(8, ge=2)
    """Fixed probe crops (own seed, never trained on) for the previews and diagnostics."""
    max_iterations: int | None = Field(None, ge=1)
    """Stop the RL loop after this many iterations (None: run until the MIM run ends)."""
    steps_per_policy: int | None = Field(10, ge=1)
    """Lock-step cadence P (the paper's alternating updates): trainer step s waits for policy
    iteration >= s // P, and RL iteration k + 1 waits for the MIM weights of step k * P
    (published then), so the policy and the MIM model stay within 2 P trainer steps of each
    other (hardness is relative to the current model). The two sides overlap, so a trainer step
    costs max(P trainer steps, one RL iteration) / P: size ``rl.ppo.train_batch_agent_steps`` so
    that one iteration takes about P trainer steps. Both sides log the gap: the trainer's
    ``train/policy_lag_steps`` (its step minus the MIM step its policy was trained against) and
    the RL side's ``rl/mim_lag_steps`` (the newest published MIM step minus the one its last
    iteration scored with). None: each side runs at its own pace (no bound on the gap)."""
    wait_for_mim: bool = True
    """Start training the policy only once the trainer has published its first MIM weights
    (scoring masks with an untrained model teaches nothing, and on a small machine it would slow
    the trainer's start)."""
    augment: bool = True
    """Augment the agents' crops with ``data.augment``, as the trainer's crops are."""
    wait_timeout_s: float = Field(600.0, gt=0)
    """How long one side waits for the other (RL actor placement, lockstep turns) before failing."""
    seed: int = 0


class DbMiMJob(MAEJob):
    """A dbMiM pretraining job: a :class:`~neuroray.trainers.pretrain.MAEJob` plus ``rl``.

    ``masking`` is the policy masker: its ``ratio`` fixes K = round(ratio * N) masked patches per
    crop on both sides (fixed-count game, ``rl.env.reward.kind: rank``) and is the random ratio
    until the first policy arrives. Controls at the same K and alpha schedule, by name:
    ``masking.invert=true`` (the inverted policy; the RL side runs), ``masking.name=heuristic``
    (top patches by gradient energy) and ``masking.name=random`` (random K), both without the RL
    side.
    """

    masking: MaskerSpec = PolicyMasker(ratio=0.75)
    rl: RLSettings = RLSettings()

    @model_validator(mode="after")
    def _rl_settings_fit(self) -> DbMiMJob:
        rl = self.rl
        if rl.steps_per_policy and rl.max_iterations:
            needed = -(-self.run.steps // rl.steps_per_policy)
            if rl.max_iterations < needed:
                raise ValueError(
                    f"lockstep needs rl.max_iterations >= run.steps / rl.steps_per_policy = "
                    f"{needed}, got {rl.max_iterations}; raise it or set it to null"
                )
        if self.rl.ppo.minibatch_size > self.rl.ppo.train_batch_agent_steps:
            raise ValueError(
                f"rl.ppo.minibatch_size {self.rl.ppo.minibatch_size} exceeds "
                f"rl.ppo.train_batch_agent_steps {self.rl.ppo.train_batch_agent_steps}"
            )
        return self

    @property
    def uses_policy(self) -> bool:
        """Whether the masks come from the RL policy (``masking.name=policy``), which needs the
        RL side; the heuristic and random controls do not."""
        return isinstance(self.masking, PolicyMasker) and self.masking.name == "policy"

    @property
    def uses_content(self) -> bool:
        """Whether the trainer reads the crops to place masks (policy, inverted or heuristic),
        and so needs dbMiM's task rather than plain MAE's."""
        return isinstance(self.masking, PolicyMasker)
