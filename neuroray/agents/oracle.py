"""The MIM oracle: observations and reconstruction losses from the latest MIM weights, in batches.

dbMiM's agents (one per patch) need two things from the masked-image model that Ray Train is
training: what each patch looks like to the current encoder (their observation) and how hard
each patch was to reconstruct under the crop's mask (their reward; by default on a target with
a noise floor, ``OracleSettings.reward_target``). :class:`MIMOracle`
holds a copy of the MAE, refreshes it from the :class:`~neuroray.trainers.weights.WeightStore`
whenever the trainer publishes, and answers for whole batches of crops at once: RLlib spends
25-50 ms per crop on its own bookkeeping, so a model forward per agent, or even per crop, would
dominate. Run it as a Ray actor with :func:`start_oracle` (CPU, or a GPU fraction).

The agents' observations (layout, features, patch statistics) are built by
:func:`neuroray.models.policy.patch_observations`, the same function the Ray Train task uses when
it samples masks from the policy, so the policy sees the same kind of input on both sides.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from neuroray.config import StrictModel
from neuroray.errors import NeurorayError
from neuroray.models.mae import MAEConfig, build_mae3d, floored_patch_loss
from neuroray.models.policy import FeatureSource, ObsLayout, patch_observations
from neuroray.trainers.weights import MIM_CHANNEL, numpy_to_state_dict


class OracleError(NeurorayError):
    """Crops or masks handed to the oracle do not fit its model (shape, dtype, grid)."""


class OracleSettings(StrictModel):
    """Where the oracle runs and which features it hands the agents."""

    num_cpus: float = Field(0.0, ge=0)
    """Logical CPUs reserved for the oracle actor (0: it shares the RL side's share)."""
    num_gpus: float = Field(0.0, ge=0)
    """A GPU fraction (e.g. 0.25) puts the oracle's MAE on CUDA beside other work."""
    threads: int = Field(1, ge=1)
    """torch CPU threads of the oracle process."""
    feature_source: FeatureSource = "patch_embed"
    reward_target: Literal["floored", "model"] = "floored"
    """What the per-patch losses that reward the agents measure: "floored" (default), each
    masked patch's voxel error over (its variance + ``variance_floor``), so flat or pure-noise
    patches cannot rank as hard (:func:`~neuroray.models.mae.floored_patch_loss`); "model", the
    MAE's own training loss (with ``norm_pix_loss`` pure noise is stretched to unit variance and
    ranks hardest)."""
    variance_floor: float = Field(2e-3, ge=0)
    """Variance floor of the "floored" target, in squared intensity (crops in [0, 1]): about
    three times the voxel noise of FIB-SEM (6e-4, measured from neighbour differences on
    fib_medulla_s1); median 4x16x16 patch variance there is about 7e-3."""


# ---------------------------------------------------------------------- observations
def as_images(crops: np.ndarray | Tensor, device: torch.device | str = "cpu") -> Tensor:
    """Crops [B, Z, Y, X] or [B, 1, Z, Y, X] (float in [0, 1]) as a float32 [B, 1, Z, Y, X]."""
    images = crops if isinstance(crops, Tensor) else torch.tensor(np.asarray(crops))  # copies
    if images.ndim == 4:
        images = images[:, None]
    if images.ndim != 5 or images.shape[1] != 1:
        raise OracleError(
            f"crops must be [B, Z, Y, X] or [B, 1, Z, Y, X], got shape {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise OracleError(f"crops must be float in [0, 1], got {images.dtype}")
    return images.to(device=device, dtype=torch.float32)


def team_losses(per_patch: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Each crop's reconstruction loss: the mean per-patch loss over its masked patches, [B]."""
    masks = masks.reshape(len(masks), -1)
    counts = np.maximum(masks.sum(1), 1)
    return (per_patch.reshape(len(per_patch), -1) * masks).sum(1) / counts


# ---------------------------------------------------------------------- the oracle
class MIMOracle:
    """An MAE copy that scores batches of crops and masks; refreshes itself from a WeightStore.

    ``model`` is the trainer's :class:`~neuroray.models.mae.MAEConfig` (or its JSON); the initial
    weights are those the trainer starts from (same ``seed``), until the store holds newer ones.
    """

    def __init__(
        self,
        model: MAEConfig | str | dict,
        *,
        seed: int = 0,
        feature_source: FeatureSource = "patch_embed",
        reward_target: Literal["floored", "model"] = "floored",
        variance_floor: float = 2e-3,
        store: Any = None,
        device: str = "auto",
        threads: int = 1,
        pin_cpus: Sequence[int] | None = None,
    ) -> None:
        if pin_cpus and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, set(pin_cpus))
        torch.set_num_threads(threads)
        if isinstance(model, str):
            model = MAEConfig.model_validate_json(model)
        elif isinstance(model, dict):
            model = MAEConfig.model_validate(model)
        self.config = model
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        torch.manual_seed(seed)  # the trainer's initial weights (run_worker seeds the same way)
        self.model = build_mae3d(model).to(self.device).eval()
        self.feature_source = feature_source
        self.reward_target = reward_target
        self.variance_floor = float(variance_floor)
        self.store = store
        self.version = 0
        self.layout = ObsLayout(self.model.encoder.embed_dim)
        self.grid = tuple(self.model.encoder.grid)
        self.crops_scored = 0

    # -- weights ------------------------------------------------------------------------------
    def set_weights(self, state_dict: dict[str, Any], version: int) -> None:
        tensors = {
            k: v if isinstance(v, Tensor) else numpy_to_state_dict({k: v})[k]
            for k, v in state_dict.items()
        }
        self.model.load_state_dict(tensors)
        self.model.eval()
        self.version = int(version)

    def refresh(self) -> int:
        """Load the newest MIM weights from the store, if any; returns the version held."""
        if self.store is None:
            return self.version
        import ray

        found = ray.get(self.store.get.remote(MIM_CHANNEL, newer_than=self.version))
        if found is not None:
            version, payload = found
            self.set_weights(payload["state_dict"], version)
        return self.version

    # -- queries ------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What an env needs to size its spaces: token grid, feature and observation sizes."""
        return {
            "grid": self.grid,
            "feature_dim": self.layout.feature_dim,
            "obs_dim": self.layout.size,
            "crop_shape": tuple(self.model.encoder.img_size),
            "patch_size": tuple(self.model.encoder.patch_size),
            "version": self.version,
        }

    def observe(self, crops: np.ndarray) -> np.ndarray:
        """Observations for a batch of crops [B, Z, Y, X]: float32 [B, N, obs_dim]."""
        self.refresh()
        images = self._images(crops)
        return patch_observations(self.model, images, self.feature_source).cpu().numpy()

    @torch.no_grad()
    def score(self, crops: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
        """Reconstruct each crop under its mask (bool [B, N] or [B, Nz, Ny, Nx], True = masked).

        Returns ``per_patch`` [B, N] (loss of each masked patch on the ``reward_target``, 0
        where visible), ``team`` [B] (the crop's loss: mean over its masked patches) and
        ``version`` (MIM weights used: the trainer step that published them).
        """
        images = self._images(crops)
        masks = self._masks(masks, len(images))
        out = self.model(images, torch.from_numpy(masks).to(self.device))
        if self.reward_target == "floored":
            losses = floored_patch_loss(self.model, images, out, self.variance_floor)
        else:
            losses = out.per_patch_loss
        per_patch = losses.float().cpu().numpy()
        self.crops_scored += len(images)
        return {
            "per_patch": per_patch,
            "team": team_losses(per_patch, masks),
            "version": np.int64(self.version),
        }

    # -- checks -------------------------------------------------------------------------------
    def _images(self, crops: np.ndarray) -> Tensor:
        images = as_images(crops, self.device)
        expected = tuple(self.model.encoder.img_size)
        if tuple(images.shape[2:]) != expected:
            raise OracleError(
                f"crops of shape {tuple(images.shape[2:])} do not match the MIM model's img_size "
                f"{expected}; sample crops of data.sampler.crop_shape"
            )
        return images

    def _masks(self, masks: np.ndarray, batch: int) -> np.ndarray:
        masks = np.asarray(masks)
        n = int(np.prod(self.grid))
        if masks.dtype != bool or masks.size != batch * n:
            raise OracleError(
                f"masks must be bool [B, N] = [{batch}, {n}] (True = masked), got "
                f"{masks.dtype} {masks.shape}"
            )
        return np.array(masks.reshape(batch, *self.grid))  # writable copy for torch


def start_oracle(
    model: MAEConfig,
    settings: OracleSettings,
    *,
    seed: int = 0,
    store: Any = None,
    pin_cpus: Sequence[int] | None = None,
) -> Any:
    """A :class:`MIMOracle` Ray actor with the resources ``settings`` asks for."""
    import ray

    device = "cuda" if settings.num_gpus > 0 else "cpu"
    actor = ray.remote(MIMOracle).options(num_cpus=settings.num_cpus, num_gpus=settings.num_gpus)
    return actor.remote(
        model.model_dump_json(),
        seed=seed,
        feature_source=settings.feature_source,
        reward_target=settings.reward_target,
        variance_floor=settings.variance_floor,
        store=store,
        device=device,
        threads=settings.threads,
        pin_cpus=pin_cpus,
    )
