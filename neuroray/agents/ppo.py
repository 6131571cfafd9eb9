"""PPO over :class:`~neuroray.agents.env.MaskingEnv`: the RLlib algorithm config of dbMiM's RL
side (one shared :class:`~neuroray.agents.module.PatchPolicyModule`) and its metrics callback."""

from __future__ import annotations

from typing import Any

from ray.rllib.callbacks.callbacks import RLlibCallback

from neuroray.agents.config import RLSettings


def build_ppo_config(rl: RLSettings, env_config: dict[str, Any], feature_dim: int) -> Any:
    """PPO over MaskingEnv with one shared PatchPolicyModule, sized for a small machine."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from neuroray.agents.env import MaskingEnv
    from neuroray.agents.module import PatchPolicyModule

    ppo = rl.ppo
    module = RLModuleSpec(
        module_class=PatchPolicyModule,
        model_config={"feature_dim": feature_dim, **rl.policy.model_dump()},
    )
    return (
        PPOConfig()
        .environment(MaskingEnv, env_config=env_config)
        .env_runners(num_env_runners=0, episodes_to_numpy=False)
        .multi_agent(
            policies={"shared"},
            policy_mapping_fn=_shared_policy,
            count_steps_by="agent_steps",
        )
        .rl_module(rl_module_spec=MultiRLModuleSpec(rl_module_specs={"shared": module}))
        .training(
            train_batch_size_per_learner=ppo.train_batch_agent_steps,
            minibatch_size=ppo.minibatch_size,
            num_epochs=ppo.num_epochs,
            lr=ppo.lr,
            entropy_coeff=ppo.entropy_coeff,
            clip_param=ppo.clip_param,
            vf_loss_coeff=ppo.vf_loss_coeff,
            grad_clip=ppo.grad_clip,
            gamma=0.99,
            lambda_=1.0,
        )
        .callbacks(MaskingMetrics)
        .debugging(seed=rl.seed, log_level="WARN")
    )


def _shared_policy(agent_id: Any, episode: Any = None, **kwargs: Any) -> str:
    return "shared"


EPISODE_MEANS = (
    "team_loss",
    "mask_ratio",
    "chosen_ratio",
    "from_nominations",
    "nominee_rank",
    "alpha",
    "reward_mean",
)
"""Per-crop infos of :class:`~neuroray.agents.env.MaskingEnv` logged as means per iteration."""


class MaskingMetrics(RLlibCallback):
    """Logs each crop's team loss, mask ratios, nomination share and rank, alpha and mean reward
    from the env's infos (keys: :data:`EPISODE_MEANS`, and ``mim_version`` as a max)."""

    def on_episode_end(self, *, episode: Any, metrics_logger: Any = None, **kwargs: Any) -> None:
        if metrics_logger is None:
            return
        heads = [a for a in episode.agent_ids if str(a).endswith("_0")]
        for info in episode.get_infos(-1, agent_ids=heads).values():
            for key in EPISODE_MEANS:
                if key in info:
                    metrics_logger.log_value(key, info[key], reduce="mean")
            if "mim_version" in info:
                metrics_logger.log_value("mim_version", info["mim_version"], reduce="max")
