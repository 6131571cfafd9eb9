"""The shared masking policy as an RLlib module: one per-patch actor-critic for every agent.

The net itself, :class:`~neuroray.models.policy.PatchPolicyNet`, is plain torch in
:mod:`neuroray.models.policy` (with the observation layout it reads), so the MIM trainer can run
the latest policy on its own batches (``mask_probability``) without RLlib;
:class:`PatchPolicyModule` wraps it as an RLlib ``TorchRLModule`` with ``ValueFunctionAPI`` for
PPO on the new API stack.
"""

from __future__ import annotations

from typing import Any

from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule
from torch import Tensor

from neuroray.errors import NeurorayError
from neuroray.models.policy import ObsLayout, PolicyConfig, build_policy_net


class PatchPolicyModule(TorchRLModule, ValueFunctionAPI):
    """RLlib module around :class:`PatchPolicyNet`.

    ``model_config``: ``feature_dim`` (the MIM encoder width D) plus :class:`PolicyConfig` keys.
    The default connectors batch every agent mapped to this module into one forward pass.
    """

    def setup(self) -> None:
        config = dict(self.model_config or {})
        try:
            feature_dim = int(config.pop("feature_dim"))
        except KeyError:
            raise NeurorayError(
                "PatchPolicyModule needs model_config['feature_dim'] (the MIM encoder width)"
            ) from None
        expected = ObsLayout(feature_dim).size
        if self.observation_space is not None and self.observation_space.shape != (expected,):
            raise NeurorayError(
                f"observation space {self.observation_space.shape} does not match feature_dim "
                f"{feature_dim} (expected ({expected},))"
            )
        # RLlib merges its own default model keys (fcnet_*, vf_share_layers, ...) in: ignore them
        ours = {k: v for k, v in config.items() if k in PolicyConfig.model_fields}
        self.net = build_policy_net(feature_dim, ours)

    def _forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {Columns.ACTION_DIST_INPUTS: self.net.logits(batch[Columns.OBS])}

    def _forward_train(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        x = self.net.inputs(batch[Columns.OBS])
        return {Columns.ACTION_DIST_INPUTS: self.net.actor(x), Columns.EMBEDDINGS: x}

    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> Tensor:
        if embeddings is None:
            embeddings = self.net.inputs(batch[Columns.OBS])
        return self.net.critic(embeddings).squeeze(-1)
