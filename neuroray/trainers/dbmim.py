"""dbMiM's Ray Train task: an MAE whose masks come from the RL side's newest published policy.

:class:`DbMiMTask` runs in every Train worker of a dbMiM run (see :mod:`neuroray.agents.dbmim`
for the whole run). Each step it polls the :class:`~neuroray.trainers.weights.WeightStore` for a
newer policy without blocking (or, with the lock-step cadence ``rl.steps_per_policy``, waits for
its turn), computes the policy's per-patch probabilities on its own batch
(:func:`~neuroray.models.policy.patch_observations` and
:class:`~neuroray.models.policy.PatchPolicyNet`, plain torch), samples the policy's choices from
them and masks by the rule of the env's game (:class:`~neuroray.masking.PolicyMasker`): in the
default fixed-count game the choices are nominations, every crop masks exactly
K = round(masking.ratio * N) patches and round(alpha_t * K) of them are drawn from the nominees
(``rl.env.alpha`` at this step of ``run.steps``), the rest at random -- the rule the agents are
rewarded under; in the emergent game the choices are the mask. Rank 0 publishes the MAE weights
every ``rl.publish_mim_every`` steps (and at every lock-step turn) for the MIM oracle. Until the
first policy arrives it masks K patches at random.

Controls at the same K and alpha schedule (no change on the RL side): ``masking.invert=true``
nominates by 1 - p (the inverted policy; the RL side still runs and learns as usual), and
``masking.name=heuristic`` nominates each crop's round(alpha_t * K) patches of highest gradient
energy (no RL side at all; :func:`neuroray.agents.dbmim.run_dbmim` runs this task alone).

Logged per step (``train/*``): ``mask_ratio``, ``policy_version``, ``policy_mask_prob`` (mean
probability of choosing a patch: nominating it, in the fixed-count game), ``policy_prob_sd``
(within-crop sd of that probability: does the policy tell patches apart?), ``policy_entropy``,
``alpha``, ``mask_from_nominations`` (share of the masked patches drawn as nominees),
``policy_lag_steps`` (this step minus the MIM step the policy was last rewarded by), and what the
coupling costs per step (``policy_ms``, ``publish_ms``).

The task lives at the trainers layer beside MAE's (:mod:`neuroray.trainers.pretrain`) and MS-Con's
(:mod:`neuroray.trainers.mscon`), and so imports nothing from :mod:`neuroray.agents`: its job is
:class:`neuroray.agents.config.DbMiMJob`, of which it reads the MAE job's fields and the RL
settings named by :class:`RLCoupling`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from neuroray.errors import NeurorayError
from neuroray.masking import (
    AlphaSchedule,
    CountRule,
    HeuristicMasker,
    PolicyMasker,
    masked_count,
)
from neuroray.models.policy import FeatureSource, patch_observations, patch_stats
from neuroray.preview import grid, to_grey
from neuroray.trainers.loop import unwrap
from neuroray.trainers.pretrain import MAEJob, MAETask, mae_preview
from neuroray.trainers.weights import (
    MIM_CHANNEL,
    POLICY_CHANNEL,
    policy_from_payload,
    state_dict_to_numpy,
)

POLL_INTERVAL_S = 0.2
"""How often a trainer worker asks the weight store for a newer policy (without waiting)."""


class DbMiMError(NeurorayError):
    """The dbMiM run cannot start or continue (resources, checkpoints, RL side failures)."""


class OracleFeatures(Protocol):
    feature_source: FeatureSource


class GameRule(Protocol):
    """What the trainer reads of ``rl.env`` (:class:`neuroray.agents.env.EnvSettings`)."""

    alpha: AlphaSchedule

    @property
    def count(self) -> CountRule: ...


class RLCoupling(Protocol):
    """What the trainer side reads of ``job.rl`` (:class:`neuroray.agents.config.RLSettings`)."""

    publish_mim_every: int
    steps_per_policy: int | None
    wait_timeout_s: float

    @property
    def oracle(self) -> OracleFeatures: ...

    @property
    def env(self) -> GameRule: ...


def binary_entropy(probs: np.ndarray | torch.Tensor) -> float:
    """Mean entropy (nats) of independent Bernoulli(p) choices."""
    p = torch.as_tensor(probs, dtype=torch.float64).clamp(1e-7, 1 - 1e-7)
    return float((-(p * p.log() + (1 - p) * (1 - p).log())).mean())


def within_crop_sd(probs: np.ndarray) -> float:
    """Standard deviation of per-patch probabilities within each crop, averaged over crops
    (0: the policy treats every patch of a crop alike, whatever its content)."""
    flat = np.asarray(probs, dtype=np.float64).reshape(len(probs), -1)
    return float(flat.std(1).mean())


# ---------------------------------------------------------------------- previews
def probability_preview(
    volume: np.ndarray,
    probs: np.ndarray,
    patch_size: Sequence[int],
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Middle z-slice of a crop | its per-patch mask probability (red = likely masked, blue =
    likely kept, over the image) | the sampled mask (hidden patches darkened), as HxWx3 uint8."""
    z = volume.shape[0] // 2
    ones = np.ones(tuple(patch_size), dtype=np.float32)
    voxel_probs = np.kron(np.asarray(probs, dtype=np.float32), ones)[z]
    grey = to_grey(volume[z])  # stretched once, so darkening below stays visible
    heat = np.stack([voxel_probs * 255, np.zeros_like(voxel_probs), (1 - voxel_probs) * 255], -1)
    tinted = (0.5 * grey[..., None] + 0.5 * heat).astype(np.uint8)
    tiles = [grey, tinted]
    if mask is not None:
        voxel_mask = np.kron(np.asarray(mask, dtype=bool), np.ones(tuple(patch_size), bool))[z]
        tiles.append(np.where(voxel_mask, grey // 4, grey).astype(np.uint8))
    return grid(tiles)


# ---------------------------------------------------------------------- trainer side
class DbMiMTask(MAETask):
    """MAE whose masks come from the newest published policy; rank 0 publishes MIM weights."""

    kind = "dbmim"
    job: MAEJob  # a neuroray.agents.config.DbMiMJob: a MAEJob plus ``rl``

    def __init__(self, job: MAEJob, worker: Any) -> None:
        super().__init__(job, worker)
        self.store = worker.extras.get("store")
        self.policy: nn.Module | None = None
        self.policy_version = 0  # RL iterations count from 1; 0 = none yet
        self.policy_mim_step = -1  # the MIM step the policy was last rewarded by (-1: unknown)
        self._poll: Any = None
        self._next_poll = 0.0
        self._publish: Any = None
        self._published_once = False

    @property
    def rl(self) -> RLCoupling:
        """The RL settings this side reads (``job.rl``)."""
        return self.job.rl  # type: ignore[attr-defined]

    # -- weight exchange ----------------------------------------------------------------------
    def poll_policy(self, step: int) -> None:
        """Take a newer policy from the store if one has arrived.

        Asks the store at most every ``POLL_INTERVAL_S`` and never blocks a step, except in
        lockstep mode, where step s waits for policy iteration ``s // rl.steps_per_policy``.
        """
        if self.store is None:
            return
        self._check_store(block=False)
        every = self.rl.steps_per_policy
        if every is None or self.policy_version >= step // every:
            return
        required, deadline = step // every, time.monotonic() + self.rl.wait_timeout_s
        while self.policy_version < required:
            if time.monotonic() > deadline:
                raise DbMiMError(
                    f"trainer step {step} waited {self.rl.wait_timeout_s:.0f} s for policy "
                    f"iteration {required} (has {self.policy_version}): the RL side stopped or "
                    "failed; see the RLRunner log, or unset rl.steps_per_policy"
                )
            self._check_store(block=True)
            if self.policy_version < required:
                time.sleep(0.02)

    def _check_store(self, block: bool) -> None:
        import ray

        now = time.monotonic()
        if self._poll is None:
            if not block and now < self._next_poll:
                return
            self._poll = self.store.get.remote(POLICY_CHANNEL, newer_than=self.policy_version)
            self._next_poll = now + POLL_INTERVAL_S
        ready, _ = ray.wait([self._poll], timeout=None if block else 0)
        if not ready:
            return
        found, self._poll = ray.get(self._poll), None
        if found is not None:
            version, payload = found
            self.policy = policy_from_payload(payload).to(self.worker.device)
            self.policy_version = int(version)
            self.policy_mim_step = int(payload.get("mim_step", -1))

    def publish_mim(self, model: nn.Module, step: int) -> None:
        import ray

        if self._publish is not None:
            ray.get(self._publish)  # at most one publication in flight
        payload = {"state_dict": state_dict_to_numpy(model.state_dict()), "step": step}
        self._publish = self.store.put.remote(MIM_CHANNEL, step, payload)
        self._published_once = True

    # -- masks --------------------------------------------------------------------------------
    @property
    def policy_masker(self) -> PolicyMasker:
        masker = self.masker
        if not isinstance(masker, PolicyMasker):
            raise DbMiMError(
                f"dbMiM's trainer needs masking.name=policy or heuristic, got {masker.name!r}; "
                "other maskers run as plain MAE controls (run_dbmim does that)"
            )
        return masker

    def alpha(self, step: int) -> float:
        """Share of the K masked patches drawn from the nominations at ``step``."""
        return self.rl.env.alpha.at(step, self.job.run.steps)

    def mask_probabilities(self, model: nn.Module, image: torch.Tensor) -> np.ndarray | None:
        """The policy's probability of choosing each patch of each crop, [B, Nz, Ny, Nx]."""
        if self.policy is None:
            return None
        raw = unwrap(model)
        with torch.autocast(device_type=image.device.type, enabled=False):  # fp32 probabilities
            obs = patch_observations(raw, image.float(), self.rl.oracle.feature_source)
            probs = self.policy.mask_probability(obs).float().cpu().numpy().astype(np.float64)
        return probs.reshape(len(image), *self.token_grid(raw))

    def use_policy(self, probs: np.ndarray | None, step: int) -> None:
        """Mask the next batch by the env's rule from these probabilities (None: at random);
        with ``masking.invert`` nominate by 1 - p (the inverted control)."""
        masker = self.policy_masker
        if probs is None:
            masker.set_source(None)
            return
        source = 1.0 - probs if masker.invert else probs
        masker.set_source(lambda grid, rng: source, count=self.rl.env.count, alpha=self.alpha(step))

    def heuristic_nominations(self, model: nn.Module, image: torch.Tensor, step: int) -> np.ndarray:
        """The heuristic control's nominations, bool [B, Nz, Ny, Nx]: in each crop the
        round(alpha K) patches with the highest gradient energy (the lowest with ``invert``)."""
        raw, masker = unwrap(model), self.policy_masker
        grid = self.token_grid(raw)
        energy = patch_stats(image.float(), raw.encoder.patch_size)[..., 2].cpu().numpy()
        order = np.argsort(energy if masker.invert else -energy, axis=1, kind="stable")
        k = masked_count(masker.ratio, energy.shape[1])
        nominations = np.zeros(energy.shape, dtype=bool)
        np.put_along_axis(nominations, order[:, : round(self.alpha(step) * k)], True, axis=1)
        return nominations.reshape(len(image), *grid)

    def set_masks_for(self, model: nn.Module, image: torch.Tensor, step: int) -> np.ndarray | None:
        """Point the masker at this batch: the policy's probabilities (returned; None before the
        first policy) or, for the heuristic control, the crops' gradient energy."""
        masker = self.policy_masker
        if isinstance(masker, HeuristicMasker):
            nominations = self.heuristic_nominations(model, image, step)
            masker.set_source(lambda grid, rng: nominations, alpha=self.alpha(step))
            return None
        probs = self.mask_probabilities(model, image)
        self.use_policy(probs, step)
        return probs

    def loss(
        self, model: nn.Module, batch: dict[str, Any], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        tick = time.perf_counter()
        self.poll_policy(step)
        probs = self.set_masks_for(model, batch["image"], step)
        coupling_ms = 1000 * (time.perf_counter() - tick)
        loss, scalars = super().loss(model, batch, step)
        masker = self.policy_masker
        stats = masker.last_stats
        scalars["mask_from_nominations"] = stats.get("from_nominations", 0.0)
        scalars["alpha"] = stats["alpha"] if masker.has_source else self.alpha(step)
        if isinstance(masker, HeuristicMasker):
            return loss, scalars
        scalars["policy_ms"] = coupling_ms  # polling + the policy's forward on this batch
        scalars["policy_version"] = float(self.policy_version)
        # every step logs these (the loop averages over all steps of a window): before the first
        # policy, the random masker's per-patch probability (its ratio) and its entropy
        marginal = probs if probs is not None else np.array([masker.ratio])
        scalars["policy_mask_prob"] = float(marginal.mean())
        scalars["policy_entropy"] = binary_entropy(marginal)
        scalars["policy_prob_sd"] = within_crop_sd(probs) if probs is not None else 0.0
        if self.policy is not None and self.policy_mim_step >= 0:
            scalars["policy_lag_steps"] = float(step - self.policy_mim_step)
        return loss, scalars

    def after_step(self, model: nn.Module, step: int) -> dict[str, float]:
        rl = self.rl
        tick = time.perf_counter()
        if self.worker.is_chief and self.store is not None:
            due = step % rl.publish_mim_every == 0
            turn = rl.steps_per_policy is not None and step % rl.steps_per_policy == 0
            if not self._published_once or due or turn:
                self.publish_mim(model, step)
        return {"publish_ms": 1000 * (time.perf_counter() - tick)}  # averaged over steps

    def previews(self, model: nn.Module, batch: dict[str, Any], step: int) -> dict[str, np.ndarray]:
        image = batch["image"][:1]
        probs = self.set_masks_for(model, image, step)
        mask = self.masks(model, 1, step)
        previews = {"pretrain/input_mask_reconstruction": mae_preview(model, image, mask)}
        if probs is not None:
            volume = image[0, 0].float().cpu().numpy()
            patch = unwrap(model).encoder.patch_size
            previews["pretrain/mask_probability"] = probability_preview(
                volume, probs[0], patch, mask[0]
            )
        return previews
