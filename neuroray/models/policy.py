"""The masking policy of dbMiM, in plain torch: what it observes and its network.

Both sides of a dbMiM run use this module without RLlib: the MIM oracle
(:mod:`neuroray.agents.oracle`) builds the agents' observations with :func:`patch_observations`,
the RL side trains :class:`PatchPolicyNet` inside an RLlib module
(:mod:`neuroray.agents.module`), and the Ray Train task (:mod:`neuroray.trainers.dbmim`) runs
the latest published net on its own batches (``mask_probability``) to sample masks.

**Observation of one patch** (float32, ``obs_dim = 2 * D + 6`` where D is the encoder width)::

    [ 0      : D    ]  feature   the patch's embedding by the current encoder (detached):
                                 the patch-embedding projection ("patch_embed", the paper's
                                 choice) or the full encoder's output token ("encoder")
    [ D      : 2D   ]  context   the mean feature over all patches of the crop (global context)
    [ 2D     : 2D+3 ]  position  patch centre (z, y, x), normalised to (0, 1) over the token grid
    [ 2D+3   : 2D+6 ]  stats     mean intensity, log(std + 1e-3), log(gradient energy + 1e-6),
                                 where gradient energy is the mean over the patch's voxels of the
                                 squared forward differences along z, y and x (intensities in [0, 1])

The same function (:func:`patch_observations`) builds the trainer's observations when it samples
masks from the policy, so the policy sees the same kind of input on both sides.

**The net** (:class:`PatchPolicyNet`): the patch feature and the crop's mean feature (the global
context), each layer-normalised (the encoder's feature scale drifts as the MIM model trains),
concatenated with the patch position and statistics. The actor and the critic are separate MLPs
over that input (no shared trunk, so value regression cannot disturb the policy). The actor
outputs 2 logits for actions [0, 1]: in dbMiM's default fixed-count game 1 *nominates* the patch
(the env masks a fixed K per crop, a share alpha of them from the nominees), in the emergent game
1 masks it. Its last layer starts near zero with a bias that makes the initial probability of
action 1 ``initial_mask_prob`` for every patch (0.5: the most nominations that still leave the
nominees a real advantage; any constant gives uniformly random masks in the fixed-count game).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from neuroray.config import StrictModel
from neuroray.errors import NeurorayError
from neuroray.models.mae import MAE3D

FeatureSource = Literal["patch_embed", "encoder"]
NUM_POSITION, NUM_STATS = 3, 3
STATS = ("mean", "log_std", "log_grad_energy")


# ---------------------------------------------------------------------- observations
@dataclass(frozen=True)
class ObsLayout:
    """Where each part of a patch observation sits (see the module docstring)."""

    feature_dim: int

    @property
    def size(self) -> int:
        return 2 * self.feature_dim + NUM_POSITION + NUM_STATS

    @property
    def feature(self) -> slice:
        return slice(0, self.feature_dim)

    @property
    def context(self) -> slice:
        return slice(self.feature_dim, 2 * self.feature_dim)

    @property
    def position(self) -> slice:
        return slice(2 * self.feature_dim, 2 * self.feature_dim + NUM_POSITION)

    @property
    def stats(self) -> slice:
        return slice(2 * self.feature_dim + NUM_POSITION, self.size)


def token_positions(grid: Sequence[int]) -> Tensor:
    """Patch centres (z, y, x) normalised to (0, 1): [N, 3], z-major like the tokens."""
    axes = [(torch.arange(n, dtype=torch.float32) + 0.5) / n for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


def patch_stats(images: Tensor, patch_size: Sequence[int]) -> Tensor:
    """Per-patch [mean, log(std + 1e-3), log(gradient energy + 1e-6)]: [B, N, 3] float32.

    Computed by average pooling with kernel = stride = patch (z-major, like the tokens); the
    variance as E[x^2] - E[x]^2 in float64, so flat patches keep std ~0.
    """
    images = images.float()
    patch = tuple(int(p) for p in patch_size)
    wide = images.double()
    mean = F.avg_pool3d(wide, patch, patch)
    var = (F.avg_pool3d(wide * wide, patch, patch) - mean * mean).clamp(min=0)
    energy = torch.zeros_like(images)  # squared forward differences, 0 at each far edge
    energy[:, :, :-1] += images.diff(dim=2).square_()
    energy[:, :, :, :-1] += images.diff(dim=3).square_()
    energy[..., :-1] += images.diff(dim=4).square_()
    grad = F.avg_pool3d(energy, patch, patch).double()
    stats = torch.cat([mean, (var.sqrt() + 1e-3).log(), (grad + 1e-6).log()], 1)
    return stats.flatten(2).transpose(1, 2).float()


@torch.no_grad()
def patch_features(model: MAE3D, images: Tensor, source: FeatureSource = "patch_embed") -> Tensor:
    """Each patch's feature under the current encoder, detached: [B, N, D] float32."""
    encoder = model.encoder
    if source == "patch_embed":
        features = encoder.patch_embed(images.to(encoder.patch_embed.proj.weight.dtype))
    elif source == "encoder":  # eval mode: no drop-path noise in the agents' view
        was_training = encoder.training
        encoder.eval()
        features = encoder.forward_features(images).tokens
        encoder.train(was_training)
    else:
        raise NeurorayError(f"feature_source must be 'patch_embed' or 'encoder', got {source!r}")
    return features.float()


@torch.no_grad()
def patch_observations(
    model: MAE3D, images: Tensor, source: FeatureSource = "patch_embed"
) -> Tensor:
    """Observations of every patch of every crop: [B, N, 2D + 6] (layout: module docstring)."""
    grid = model.encoder.grid_of(images)
    features = patch_features(model, images, source)
    b, n, _ = features.shape
    context = features.mean(1, keepdim=True).expand(-1, n, -1)
    position = token_positions(grid).to(features.device).expand(b, -1, -1)
    stats = patch_stats(images, model.encoder.patch_size).to(features.device)
    return torch.cat([features, context, position, stats], -1)


# ---------------------------------------------------------------------- the net
MASK = 1
"""Action (and logit index) that nominates (fixed-count game) or masks (emergent game) a patch."""


class PolicyConfig(StrictModel):
    """Size of the shared per-patch actor-critic."""

    hidden: int = Field(64, ge=1)
    depth: int = Field(2, ge=1)
    """Hidden layers of the actor and of the critic."""
    initial_mask_prob: float = Field(0.5, gt=0, lt=1)
    """Initial probability of action 1 (nominate, or mask in the emergent game), every patch."""


def _mlp(inputs: int, hidden: int, depth: int, outputs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(inputs if i == 0 else hidden, hidden), nn.Tanh()]
    layers.append(nn.Linear(hidden, outputs))
    return nn.Sequential(*layers)


class PatchPolicyNet(nn.Module):
    """obs [..., 2D + 6] -> logits [..., 2] ([keep, mask]) and value [...]."""

    def __init__(
        self, feature_dim: int, hidden: int = 64, depth: int = 2, initial_mask_prob: float = 0.5
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
        """Probability of action 1 (nominate / mask) for each patch: obs [..., 2D + 6] -> [...]."""
        return self.logits(obs.float()).softmax(-1)[..., MASK]


def build_policy_net(feature_dim: int, config: PolicyConfig | dict[str, Any]) -> PatchPolicyNet:
    config = config if isinstance(config, PolicyConfig) else PolicyConfig.model_validate(config)
    return PatchPolicyNet(
        feature_dim,
        hidden=config.hidden,
        depth=config.depth,
        initial_mask_prob=config.initial_mask_prob,
    )
