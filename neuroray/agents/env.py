"""MaskingEnv: dbMiM's masking game as an RLlib multi-agent environment.

Every patch of a crop is an agent; all agents share one policy (``policy_mapping_fn`` maps each
to ``"shared"``). An episode is one step: the agents see their patch, each chooses
**0** or **1**, the env turns the joint choices into the crop's mask, the MIM oracle reconstructs
the crop under that mask, and every agent is rewarded.

For throughput an episode plays ``crops_per_episode`` (B) independent crops at once, so the
oracle observes and scores B crops per call; crops never interact (each agent's reward depends
only on its own crop), so with one-step episodes this is B one-crop episodes played side by side.
With ``crops_per_episode=1`` an episode is exactly one crop.

**Agents**: ``"<b>_<i>"`` for crop b in 0..B-1 and patch i in 0..N-1 (z-major token order).

**Observation** of each agent: float32 ``[2D + 6]`` from :func:`~neuroray.agents.oracle.
patch_observations` -- the patch's detached encoder feature (D), the crop's mean feature (D, the
global context), the patch centre (z, y, x) in (0, 1), and [mean, log std, log gradient energy].

**Action**: ``Discrete(2)``. What 1 means depends on the game, which the reward's ``kind`` picks.

**The default game: fixed count, learned placement** (``reward.kind="rank"``). Action 1
*nominates* the agent's patch. Every crop masks exactly K = ``masked_count(ratio, N)`` patches
(``ratio``: the job's ``masking.ratio``, 0.75 by default): round(alpha_t * K) of them drawn at
random among the nominees (topped up at random when there are too few), the rest uniformly at
random (:func:`neuroray.masking.nominated_mask`, the rule the trainer's masker follows too).
alpha_t rises over training (``EnvSettings.alpha``: 0 -> 0.5 over ``run.steps``), read at the
trainer step of the MIM weights the oracle last scored with. The count never depends on the
policy. The reward of agent i in crop c::

    r_i = s * m_i * rc_i        rc_i = (rank of l_i among the crop's masked losses - (K + 1) / 2)
                                       / ((K - 1) / 2)        (ties share their mean rank)

    m_i   1 if patch i was masked (by nomination or at random), else 0
    l_i   its reconstruction loss under the crop's mask (the oracle's target has a noise floor,
          ``rl.oracle.variance_floor``, so pure noise is not "hard")
    s     +1 "harder" (default: masking hard patches is good) or -1 "easier"

rc is in [-1, 1] and sums to zero over each crop's masked patches, so the reward carries no
incentive on how many patches are masked or nominated, only on *which*: a patch whose loss ranks
high gains by being nominated (nominees are masked more often than the others), one whose loss
ranks low loses. Ranks are robust to the loss drifting as the MIM model learns. The random
share keeps losses of patches the policy did not nominate (its counterfactuals) in every crop.
The learning signal grows with alpha_t (at alpha 0 nominations change nothing).

**The emergent-count game** (``reward.kind="emergent"``, the original dbMiM formulation; kept
for comparison, it collapses): action 1 *masks* the patch, the ratio emerges from the agents'
choices, and the reward is :func:`emergent_rewards` (see :class:`EmergentRewardSettings` for
its formula and why the policy learns "mask more" rather than "where"). A crop whose agents all
chose the same action has one agent, picked at random, flipped (the MAE needs one masked and one
visible patch); rewards use the mask the oracle actually scored.

**Infos**: the first agent of each crop (``"<b>_0"``) carries the crop's ``team_loss`` (mean
loss of its masked patches), ``mask_ratio`` (scored), ``chosen_ratio`` (share of agents that
chose 1), ``from_nominations`` (share of the masked patches drawn as nominees; 1 in the emergent
game), ``nominee_rank`` (mean rc of the masked patches drawn as nominees, 0 when none: above 0,
the nominations find patches harder than the crop's average masked patch), ``alpha``,
``reward_mean`` and ``mim_version``; other agents get ``{}``.

Crops come from a :class:`CropSource`: :class:`PoolCrops` draws them from the ServerPool the MIM
trainer reads (same data), :class:`ArrayCrops` from any in-memory array (tests, notebooks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal, Protocol

import gymnasium as gym
import numpy as np
from pydantic import Field, model_validator
from ray.rllib.env.multi_agent_env import MultiAgentEnv
from scipy.stats import rankdata

from neuroray.config import StrictModel
from neuroray.errors import NeurorayError
from neuroray.masking import (
    AlphaSchedule,
    CountRule,
    ensure_both,
    masked_count,
    nominated_mask,
)
from neuroray.platform.augment import Sample, as_float_image


class EnvError(NeurorayError):
    """The masking env was configured inconsistently (crop source, oracle or actions)."""


# ---------------------------------------------------------------------- reward
class RankRewardSettings(StrictModel):
    """The default reward: each masked patch's loss, rank-centred within its crop's masked set.

    ``r_i = s * m_i * rc_i`` (module docstring): it sums to zero over each crop, so it carries
    no incentive on the count, only on placement. Used with the fixed-count game.
    """

    kind: Literal["rank"] = "rank"
    mode: Literal["harder", "easier"] = "harder"
    """"harder": reward nominating patches that are hard to reconstruct (default); "easier": the
    opposite."""


class EmergentRewardSettings(StrictModel):
    """The original emergent-ratio reward (kept to compare against; **it collapses**).

    ::

        r_i = s * (w_team * T_c + w_agent * m_i * l_i)  -  w_ratio * N * max(0, d(rho_c) - d(rho_c^-i))

        m_i      1 if agent i masked its patch, else 0 (after the at-least-one fix-up)
        l_i      reconstruction loss of patch i under the crop's joint mask (0 when visible)
        T_c      the crop's team loss: mean of l over its masked patches (the MAE loss of the crop)
        rho_c    the emergent mask ratio of the crop (mean of m over its N patches)
        rho_c^-i the ratio had agent i chosen the other action: rho_c + (1 - 2 m_i) / N
        d        distance outside the band [lo, hi]: max(0, lo - rho) + max(0, rho - hi)
        s        +1 for "harder" or -1 for "easier"

    The band term charges each agent its own share of a band violation: an agent whose choice
    moved the ratio out (a masking agent above the band, a keeping agent below it) loses
    ``w_ratio`` times the part of its 1/N step outside the band; the others lose nothing.

    **Known collapse.** The own-patch term is >= 0 for every patch (about 1 under the
    normalised-pixel loss), so under "harder" masking pays for *every* patch whatever it shows:
    the policy learns "mask more", not "where", and the ratio runs to the band's ceiling (with
    64 patches per crop the band only bites near p = 0.95, which predicts the measured 0.949 with
    no image information at all); "easier" is the mirror image and drives the ratio to the
    floor. The team term is shared, rises with the ratio, and adds variance; the entropy bonus
    acts on the ratio, not on where. The authors' own adaptive policies collapsed the same way.
    Use it only to reproduce that; the default is :class:`RankRewardSettings`.
    """

    kind: Literal["emergent"] = "emergent"
    mode: Literal["harder", "easier"] = "harder"
    team_weight: float = Field(1.0, ge=0)
    agent_weight: float = Field(1.0, ge=0)
    ratio_band: tuple[float, float] = (0.4, 0.95)
    ratio_weight: float = Field(2.0, ge=0)
    """Reward an agent loses for pushing the ratio out of the band; above the typical per-patch
    loss, so the band holds."""

    @model_validator(mode="after")
    def _band(self) -> EmergentRewardSettings:
        lo, hi = self.ratio_band
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"ratio_band must satisfy 0 <= lo <= hi <= 1, got {self.ratio_band}")
        return self


RewardSettings = Annotated[RankRewardSettings | EmergentRewardSettings, Field(discriminator="kind")]
"""``rl.env.reward``: ``kind: rank`` (default, fixed count) or ``kind: emergent``."""


def rank_centred(values: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Each masked entry's rank among its row's masked entries, centred and scaled to [-1, 1].

    ``values`` and ``masks`` [B, N]; ties share their mean rank; 0 where not masked and in rows
    with fewer than two masked entries. Every row sums to zero. float64 [B, N].
    """
    masks = np.asarray(masks, dtype=bool).reshape(len(masks), -1)
    values = np.asarray(values, dtype=np.float64).reshape(masks.shape)
    out = np.zeros(masks.shape, dtype=np.float64)
    for row in range(len(masks)):
        idx = np.flatnonzero(masks[row])
        k = len(idx)
        if k < 2:
            continue
        ranks = rankdata(values[row, idx])  # 1 .. k, ties averaged
        out[row, idx] = (ranks - (k + 1) / 2) / ((k - 1) / 2)
    return out


def rank_rewards(
    per_patch: np.ndarray, masks: np.ndarray, config: RankRewardSettings
) -> np.ndarray:
    """Rewards [B, N] of the fixed-count game: ``s * rank_centred(loss)`` on masked patches."""
    sign = 1.0 if config.mode == "harder" else -1.0
    return (sign * rank_centred(per_patch, masks)).astype(np.float32)


def ratio_penalty(ratio: np.ndarray, band: tuple[float, float]) -> np.ndarray:
    """Distance of each mask ratio outside ``band`` (0 inside)."""
    lo, hi = band
    return np.maximum(0.0, lo - ratio) + np.maximum(0.0, ratio - hi)


def emergent_rewards(
    per_patch: np.ndarray, masks: np.ndarray, team: np.ndarray, config: EmergentRewardSettings
) -> np.ndarray:
    """Rewards [B, N] of the emergent game from per-patch losses [B, N], masks [B, N] and team
    losses [B] (formula: :class:`EmergentRewardSettings`)."""
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
    reward: RewardSettings = RankRewardSettings()
    """The game: ``kind: rank`` (fixed count, learned placement; default) or ``kind: emergent``."""
    alpha: AlphaSchedule = AlphaSchedule()
    """Share of each crop's K masked patches drawn from the nominees, over the run's steps (the
    fixed-count game; the trainer's masker follows the same schedule)."""
    prefetch: bool = True
    """Ask the oracle for the next crops' observations while RLlib digests this step."""

    @property
    def count(self) -> CountRule:
        """The count rule the reward's game implies: "fixed" (rank) or "emergent"."""
        return "fixed" if self.reward.kind == "rank" else "emergent"


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
    (an :class:`EnvSettings` or its dict), ``ratio`` (the job's ``masking.ratio``: K =
    ``masked_count(ratio, N)``, default 0.75), ``total_steps`` (the trainer's ``run.steps``, the
    length of the alpha schedule; None holds alpha at its start) and ``seed``.
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
        ratio = float(config.get("ratio", 0.75))
        if not 0 < ratio < 1:
            raise EnvError(f"env_config['ratio'] must be in (0, 1), got {ratio}")
        self.count: CountRule = self.settings.count
        self.k = masked_count(ratio, self.num_patches)
        """Patches masked in every crop (the fixed-count game)."""
        self.total_steps: int | None = config.get("total_steps")
        self.mim_step = int(info.get("version", 0))
        """Trainer step of the MIM weights last scored with: the alpha schedule's clock."""
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
        """What the last step scored: crops, choices, masks, nominee draws, losses, rewards."""

    @property
    def alpha(self) -> float:
        """Share of the K masked patches drawn from the nominees, at the current trainer step."""
        return self.settings.alpha.at(self.mim_step, self.total_steps)

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

    def actions_to_choices(self, actions: dict[str, Any]) -> np.ndarray:
        """The agents' choices [B, N] (True = action 1: nominate, or mask in the emergent game)."""
        missing = set(self.possible_agents) - set(actions)
        if missing:
            raise EnvError(
                f"step() needs an action from every agent; missing {sorted(missing)[:5]}"
            )
        values = np.fromiter(
            (int(actions[a]) for a in self.possible_agents), dtype=np.int64, count=len(actions)
        )
        if not np.isin(values, (0, 1)).all():
            raise EnvError("actions must be 0 or 1")
        return values.reshape(-1, self.num_patches).astype(bool)

    def choices_to_masks(self, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """The crops' masks [B, N], which masked patches were drawn as nominees, and alpha."""
        if self.count == "fixed":
            alpha = self.alpha
            masks, from_nominees = nominated_mask(chosen, self.k, alpha, self._rng)
            return masks, from_nominees, alpha
        masks = ensure_both(chosen.copy(), self._rng.random(chosen.shape))
        return masks, masks.copy(), 1.0

    def step(self, action_dict: dict[str, Any]):
        if self._crops is None:
            raise EnvError("call reset() before step()")
        chosen = self.actions_to_choices(action_dict)
        masks, from_nominees, alpha = self.choices_to_masks(chosen)
        scored = _submit(self.oracle, "score", self._crops, masks)
        if self.settings.prefetch:  # the oracle observes the next crops while RLlib works
            self._pending = self._request()
        scored = _result(scored)
        per_patch = np.asarray(scored["per_patch"], dtype=np.float64)
        team = np.asarray(scored["team"], dtype=np.float64)
        self.mim_step = int(scored["version"])
        reward = self.settings.reward
        if isinstance(reward, RankRewardSettings):
            rewards = rank_rewards(per_patch, masks, reward)
        else:
            rewards = emergent_rewards(per_patch, masks, team, reward)
        ranks = rank_centred(per_patch, masks)
        self.last = {
            "crops": self._crops,
            "chosen": chosen,
            "masks": masks,
            "from_nominees": from_nominees,
            "per_patch": per_patch,
            "team": team,
            "rewards": rewards,
            "obs": self._obs,
            "alpha": alpha,
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
            drawn = from_nominees[c]
            infos[f"{c}_0"] = {
                "team_loss": float(team[c]),
                "mask_ratio": float(masks[c].mean()),
                "chosen_ratio": float(chosen[c].mean()),
                "from_nominations": float(drawn.sum() / max(1, masks[c].sum())),
                "nominee_rank": float(ranks[c][drawn].mean()) if drawn.any() else 0.0,
                "alpha": float(alpha),
                "reward_mean": float(rewards[c].mean()),
                "mim_version": int(scored["version"]),
            }
        obs = self._obs_dict(self._obs)
        self._crops = None
        return obs, reward_dict, terminated, truncated, infos
