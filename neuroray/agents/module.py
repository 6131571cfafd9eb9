"""The shared masking policy: one per-patch actor-critic for every agent, with global context.

:class:`PatchPolicyNet` is plain torch, so the MIM trainer can run the latest policy on its own
batches (``mask_probability``) without RLlib; :class:`PatchPolicyModule` wraps it as an RLlib
``TorchRLModule`` with ``ValueFunctionAPI`` for PPO on the new API stack.

Input: a patch observation (layout in :mod:`neuroray.agents.oracle`): its feature and the crop's
mean feature (the global context), each layer-normalised (the encoder's feature scale drifts as
the MIM model trains), concatenated with the patch position and statistics. The actor and the
critic are separate MLPs over that input (no shared trunk, so value regression cannot disturb the
policy). The actor outputs 2 logits, [keep, mask]; its last layer starts near zero with a bias
that makes the initial probability of masking ``initial_mask_prob`` (MAE's usual 0.75), so the
first policy behaves like the random masker it replaces.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule
from torch import Tensor, nn

from neuroray.agents.oracle import ObsLayout
from neuroray.config import StrictModel
from neuroray.errors import NeurorayError

MASK = 1
"""Action (and logit index) that masks a patch; 0 keeps it."""


class PolicyConfig(StrictModel):
    """Size of the shared per-patch actor-critic."""

    hidden: int = Field(64, ge=1)
    depth: int = Field(2, ge=1)
    """Hidden layers of the actor and of the critic."""
    initial_mask_prob: float = Field(0.75, gt=0, lt=1)


def _mlp(inputs: int, hidden: int, depth: int, outputs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(inputs if i == 0 else hidden, hidden), nn.Tanh()]
    layers.append(nn.Linear(hidden, outputs))
    return nn.Sequential(*layers)


class PatchPolicyNet(nn.Module):
    """obs [..., 2D + 6] -> logits [..., 2] ([keep, mask]) and value [...]."""

    def __init__(
        self, feature_dim: int, hidden: int = 64, depth: int = 2, initial_mask_prob: float = 0.75
    ) -> None:
        super().__init__()
        self.layout = ObsLayout(feature_dim)
        self.feature_norm = nn.LayerNorm(feature_dim)
        self.context_norm = nn.LayerNorm(feature_dim)
        self.actor = _mlp(self.layout.size, hidden, depth, 2)
        self.critic = _mlp(self.layout.size, hidden, depth, 1)
        last = self.actor[-1]
        nn.init.normal_(last.weight, std=0.01)
        with torch.no_grad():
            last.bias.zero_()
            last.bias[MASK] = math.log(initial_mask_prob / (1 - initial_mask_prob))

    def inputs(self, obs: Tensor) -> Tensor:
        layout = self.layout
        if obs.shape[-1] != layout.size:
            raise NeurorayError(
                f"policy expects observations of size {layout.size} (feature_dim "
                f"{layout.feature_dim}), got {obs.shape[-1]}; the policy and the MIM encoder width "
                "must match"
            )
        return torch.cat(
            [
                self.feature_norm(obs[..., layout.feature]),
                self.context_norm(obs[..., layout.context]),
                obs[..., layout.position.start :],
            ],
            -1,
        )

    def logits(self, obs: Tensor) -> Tensor:
        return self.actor(self.inputs(obs))

    def value(self, obs: Tensor) -> Tensor:
        return self.critic(self.inputs(obs)).squeeze(-1)

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        x = self.inputs(obs)
        return self.actor(x), self.critic(x).squeeze(-1)

    @torch.no_grad()
    def mask_probability(self, obs: Tensor) -> Tensor:
        """Probability that the policy masks each patch: obs [..., 2D + 6] -> [...]."""
        return self.logits(obs.float()).softmax(-1)[..., MASK]


def build_policy_net(feature_dim: int, config: PolicyConfig | dict[str, Any]) -> PatchPolicyNet:
    config = config if isinstance(config, PolicyConfig) else PolicyConfig.model_validate(config)
    return PatchPolicyNet(
        feature_dim,
        hidden=config.hidden,
        depth=config.depth,
        initial_mask_prob=config.initial_mask_prob,
    )


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
