"""MaskingEnv: dbMiM's masking game as an RLlib multi-agent environment.

Every patch of a crop is an agent; all agents share one policy (``policy_mapping_fn`` maps each
to ``"shared"``). An episode is one step: the agents see their patch, each chooses
**keep (0)** or **mask (1)**, the joint choices form the crop's mask, the MIM oracle reconstructs
the crop under that mask, and every agent is rewarded. The mask ratio is not set by anyone: it
emerges from the agents' choices.

For throughput an episode plays ``crops_per_episode`` (B) independent crops at once, so the
oracle observes and scores B crops per call; crops never interact (each agent's reward depends
only on its own crop), so with one-step episodes this is B one-crop episodes played side by side.
With ``crops_per_episode=1`` an episode is exactly one crop.

**Agents**: ``"<b>_<i>"`` for crop b in 0..B-1 and patch i in 0..N-1 (z-major token order).

**Observation** of each agent: float32 ``[2D + 6]`` from :func:`~neuroray.agents.oracle.
patch_observations` -- the patch's detached encoder feature (D), the crop's mean feature (D, the
global context), the patch centre (z, y, x) in (0, 1), and [mean, log std, log gradient energy].

**Action**: ``Discrete(2)``, 1 = mask the patch, 0 = keep it visible.

**Reward** of agent i in crop c (``RewardSettings``)::

    r_i = s * (w_team * T_c + w_agent * m_i * l_i)  -  w_ratio * N * max(0, d(rho_c) - d(rho_c^-i))

    m_i      1 if agent i masked its patch, else 0 (after the at-least-one fix-up below)
    l_i      reconstruction loss of patch i under the crop's joint mask (0 when visible)
    T_c      the crop's team loss: mean of l over its masked patches (the MAE loss of the crop)
    rho_c    the emergent mask ratio of the crop (mean of m over its N patches)
    rho_c^-i the ratio had agent i chosen the other action: rho_c + (1 - 2 m_i) / N
    d        distance outside the band [lo, hi]: max(0, lo - rho) + max(0, rho - hi)
    s        +1 for "harder" (default: masks that are hard to reconstruct are good, as in the
             authors' Patch-AutoAugment lineage) or -1 for "easier" (their later variant)

The band term charges each agent its own share of a band violation: nothing while the ratio is
inside the band; outside it, an agent whose choice moved the ratio out (a masking agent above the
band, a keeping agent below it) loses ``w_ratio`` (the part of its 1/N step that lies outside the
band, times ``w_ratio``), the others lose nothing. A penalty shared equally by all N agents would
move each agent's reward by only ``w_ratio / N`` per choice and, with per-patch losses near 1,
would not stop every agent from masking (the policy collapses to ratio 1).

The MAE needs at least one masked and one visible patch per crop, so in a crop whose agents all
chose the same action one agent, picked at random, has its choice flipped; rewards use the mask
the oracle actually scored.

**Infos**: the first agent of each crop (``"<b>_0"``) carries the crop's ``team_loss``,
``mask_ratio`` (scored), ``chosen_ratio`` (before the fix-up), ``reward_mean`` and
``mim_version``; other agents get ``{}``.

Crops come from a :class:`CropSource`: :class:`PoolCrops` draws them from the ServerPool the MIM
trainer reads (same data), :class:`ArrayCrops` from any in-memory array (tests, notebooks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

import gymnasium as gym
import numpy as np
from pydantic import Field, model_validator
from ray.rllib.env.multi_agent_env import MultiAgentEnv

from neuroray.config import StrictModel
from neuroray.errors import NeurorayError
from neuroray.masking import ensure_both
from neuroray.platform.augment import Sample, as_float_image


class EnvError(NeurorayError):
    """The masking env was configured inconsistently (crop source, oracle or actions)."""


# ---------------------------------------------------------------------- reward
class RewardSettings(StrictModel):
    """The reward of the masking game (definition in the module docstring)."""

    mode: Literal["harder", "easier"] = "harder"
    """"harder": reward masks that are hard to reconstruct (default); "easier": the opposite."""
    team_weight: float = Field(1.0, ge=0)
    agent_weight: float = Field(1.0, ge=0)
    ratio_band: tuple[float, float] = (0.4, 0.95)
    ratio_weight: float = Field(2.0, ge=0)
    """Reward an agent loses for pushing the ratio out of the band; above the typical per-patch
    loss, so the band holds."""

    @model_validator(mode="after")
    def _band(self) -> RewardSettings:
        lo, hi = self.ratio_band
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"ratio_band must satisfy 0 <= lo <= hi <= 1, got {self.ratio_band}")
        return self


def ratio_penalty(ratio: np.ndarray, band: tuple[float, float]) -> np.ndarray:
    """Distance of each mask ratio outside ``band`` (0 inside)."""
    lo, hi = band
    return np.maximum(0.0, lo - ratio) + np.maximum(0.0, ratio - hi)


def masking_rewards(
    per_patch: np.ndarray, masks: np.ndarray, team: np.ndarray, config: RewardSettings
) -> np.ndarray:
    """Rewards [B, N] of every agent from per-patch losses [B, N], masks [B, N] and team [B]."""
    masks = masks.reshape(len(masks), -1).astype(np.float64)
    n = masks.shape[1]
    sign = 1.0 if config.mode == "harder" else -1.0
    ratio = masks.mean(1, keepdims=True)
    flipped = ratio + (1 - 2 * masks) / n
    excess = ratio_penalty(ratio, config.ratio_band) - ratio_penalty(flipped, config.ratio_band)
    band = n * np.maximum(0.0, excess)
    loss_terms = config.team_weight * team[
        :, None
    ] + config.agent_weight * masks * per_patch.reshape(masks.shape)
    return (sign * loss_terms - config.ratio_weight * band).astype(np.float32)


class EnvSettings(StrictModel):
    """The masking env's knobs (the oracle and crop source are runtime objects, not config)."""

    crops_per_episode: int = Field(4, ge=1)
    """Crops played side by side per episode: one oracle call per B crops."""
    reward: RewardSettings = RewardSettings()
    prefetch: bool = True
    """Ask the oracle for the next crops' observations while RLlib digests this step."""


# ---------------------------------------------------------------------- crop sources
class CropSource(Protocol):
    """Where the env's crops come from: ``sample(n, rng) -> float32 [n, Z, Y, X] in [0, 1]``."""

    crop_shape: tuple[int, int, int]

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray: ...


class ArrayCrops:
    """Random crops from an in-memory volume (uint8 scaled by 1/255, float taken as [0, 1])."""

    def __init__(self, volume: np.ndarray, crop_shape: Sequence[int]) -> None:
        volume = np.asarray(volume)
        if volume.ndim != 3:
            raise EnvError(f"ArrayCrops needs a 3D (z, y, x) volume, got shape {volume.shape}")
        self.crop_shape = tuple(int(c) for c in crop_shape)
        if any(c > s for c, s in zip(self.crop_shape, volume.shape, strict=True)):
            raise EnvError(f"crop {self.crop_shape} does not fit in volume {volume.shape}")
        self.volume = volume

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        hi = np.asarray(self.volume.shape) - np.asarray(self.crop_shape) + 1
        starts = rng.integers(0, hi, size=(n, 3))
        return np.stack(
            [
                as_float_image(
                    self.volume[
                        tuple(slice(s, s + c) for s, c in zip(st, self.crop_shape, strict=True))
                    ]
                )
                for st in starts
            ]
        ).astype(np.float32)


class PoolCrops:
    """Crops from the MIM trainer's ServerPool, drawn like its sampler draws them.

    ``augment`` (an augment.Compose, e.g. ``build_pipeline(data.augment)``) makes the agents see
    what the trainer's policy masker sees.
    """

    def __init__(self, pool: Any, sampler: Any, augment: Callable | None = None) -> None:
        self.pool = pool
        self.sampler = sampler
        self.augment = augment
        self.crop_shape = tuple(sampler.crop_shape)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        boxes = [self.sampler.draw(rng) for _ in range(n)]
        images = self.pool.get_crops(boxes)["image"]
        crops = []
        for image in images:
            image = as_float_image(np.asarray(image))
            if self.augment is not None:
                image = self.augment(Sample(image, None, voxel_size=self.pool.voxel_size), rng)
                image = image.image
            crops.append(np.asarray(image, dtype=np.float32).reshape(self.crop_shape))
        return np.stack(crops)


# ---------------------------------------------------------------------- oracle calls
def _submit(target: Any, method: str, *args: Any) -> Any:
    """Call ``target.method(*args)``: a Ray ObjectRef for an actor, the value for an object."""
    fn = getattr(target, method)
    return fn.remote(*args) if hasattr(fn, "remote") else fn(*args)


def _result(pending: Any) -> Any:
    import ray

    return ray.get(pending) if isinstance(pending, ray.ObjectRef) else pending


# ---------------------------------------------------------------------- the env
class MaskingEnv(MultiAgentEnv):
    """One agent per patch, one step per episode (see the module docstring).

    ``config`` (RLlib's ``env_config``) holds ``oracle`` (a :class:`~neuroray.agents.oracle.
    MIMOracle` or its actor handle), ``crops`` (a :class:`CropSource`), optionally ``settings``
    (an :class:`EnvSettings` or its dict) and ``seed``.
    """

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__()
        config = dict(config or {})
        try:
            self.oracle = config["oracle"]
            self.crops: CropSource = config["crops"]
        except KeyError as err:
            raise EnvError(
                f"MaskingEnv needs env_config[{err.args[0]!r}] (oracle and crops)"
            ) from None
        settings = config.get("settings", EnvSettings())
        self.settings = (
            settings if isinstance(settings, EnvSettings) else EnvSettings.model_validate(settings)
        )
        info = _result(_submit(self.oracle, "describe"))
        if tuple(info["crop_shape"]) != tuple(self.crops.crop_shape):
            raise EnvError(
                f"crop source gives {tuple(self.crops.crop_shape)} crops but the oracle's model "
                f"takes {tuple(info['crop_shape'])}"
            )
        self.grid = tuple(info["grid"])
        self.num_patches = int(np.prod(self.grid))
        self.obs_dim = int(info["obs_dim"])
        self.feature_dim = int(info["feature_dim"])
        b = self.settings.crops_per_episode
        self.possible_agents = [f"{c}_{i}" for c in range(b) for i in range(self.num_patches)]
        self.agents = list(self.possible_agents)
        obs_space = gym.spaces.Box(-np.inf, np.inf, (self.obs_dim,), np.float32)
        act_space = gym.spaces.Discrete(2)
        self.observation_spaces = dict.fromkeys(self.possible_agents, obs_space)
        self.action_spaces = dict.fromkeys(self.possible_agents, act_space)
        self._rng = np.random.default_rng(config.get("seed", 0))
        self._pending: tuple[np.ndarray, Any] | None = None
        self._crops: np.ndarray | None = None
        self._obs: np.ndarray | None = None
        self.last: dict[str, Any] = {}
        """What the last step scored: crops, masks, rewards, team losses (for previews)."""

    # -- crops and observations ---------------------------------------------------------------
    def _request(self) -> tuple[np.ndarray, Any]:
        crops = self.crops.sample(self.settings.crops_per_episode, self._rng)
        return crops, _submit(self.oracle, "observe", crops)

    def _obs_dict(self, obs: np.ndarray) -> dict[str, np.ndarray]:
        flat = obs.reshape(-1, self.obs_dim)
        return dict(zip(self.possible_agents, flat, strict=True))

    # -- gym API ------------------------------------------------------------------------------
    def reset(
        self, *, seed: int | None = None, options: dict | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
        if seed is not None:
            self._rng = np.random.default_rng(seed)
            self._pending = None
        pending, self._pending = self._pending or self._request(), None
        self._crops, obs = pending[0], _result(pending[1])
        self._obs = np.asarray(obs, dtype=np.float32).reshape(
            len(self._crops), self.num_patches, self.obs_dim
        )
        self.agents = list(self.possible_agents)
        return self._obs_dict(self._obs), {}

    def actions_to_masks(self, actions: dict[str, Any]) -> np.ndarray:
        """The joint mask [B, N] from the agents' actions (1 = mask)."""
        missing = set(self.possible_agents) - set(actions)
        if missing:
            raise EnvError(
                f"step() needs an action from every agent; missing {sorted(missing)[:5]}"
            )
        values = np.fromiter(
            (int(actions[a]) for a in self.possible_agents), dtype=np.int64, count=len(actions)
        )
        if not np.isin(values, (0, 1)).all():
            raise EnvError("actions must be 0 (keep) or 1 (mask)")
        return values.reshape(-1, self.num_patches).astype(bool)

    def step(self, action_dict: dict[str, Any]):
        if self._crops is None:
            raise EnvError("call reset() before step()")
        chosen = self.actions_to_masks(action_dict)
        masks = ensure_both(chosen.copy(), self._rng.random(chosen.shape))
        scored = _submit(self.oracle, "score", self._crops, masks)
        if self.settings.prefetch:  # the oracle observes the next crops while RLlib works
            self._pending = self._request()
        scored = _result(scored)
        per_patch = np.asarray(scored["per_patch"], dtype=np.float64)
        team = np.asarray(scored["team"], dtype=np.float64)
        rewards = masking_rewards(per_patch, masks, team, self.settings.reward)
        self.last = {
            "crops": self._crops,
            "masks": masks,
            "per_patch": per_patch,
            "team": team,
            "rewards": rewards,
            "obs": self._obs,
        }

        agents = self.possible_agents
        flat_rewards = rewards.reshape(-1)
        reward_dict = {a: float(r) for a, r in zip(agents, flat_rewards, strict=True)}
        terminated = dict.fromkeys(agents, True)
        terminated["__all__"] = True
        truncated = dict.fromkeys(agents, False)
        truncated["__all__"] = False
        infos: dict[str, dict] = {a: {} for a in agents}
        for c in range(len(masks)):
            infos[f"{c}_0"] = {
                "team_loss": float(team[c]),
                "mask_ratio": float(masks[c].mean()),
                "chosen_ratio": float(chosen[c].mean()),
                "reward_mean": float(rewards[c].mean()),
                "mim_version": int(scored["version"]),
            }
        obs = self._obs_dict(self._obs)
        self._crops = None
        return obs, reward_dict, terminated, truncated, infos
