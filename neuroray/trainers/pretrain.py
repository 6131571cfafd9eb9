"""Self-supervised pretraining jobs on Ray Train: MAE-3D here; dbMiM and MS-Con build on it.

``neuroray pretrain mae configs/pretrain_mae.yaml run.steps=200`` runs :func:`pretrain`: it
starts chunk servers for the image layer, then a TorchTrainer whose workers pull crops, mask
them, and train the MAE. The checkpoint (see trainers/loop.py) holds the encoder under
``encoder.``, which fine-tuning loads.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from pydantic import model_validator
from torch import nn

from neuroray.masking import Masker, MaskerSpec, RandomMasker
from neuroray.models.mae import MAE3D, MAEConfig, build_mae3d
from neuroray.preview import grid, to_grey
from neuroray.trainers.data import (
    DataSettings,
    check_crop_matches_model,
    crop_batches,
    run_with_pool,
)
from neuroray.trainers.loop import TrainTask, unwrap
from neuroray.trainers.settings import TrainJob


class MAEJob(TrainJob):
    """An MAE-style pretraining job: data, model, masking, optimiser, run."""

    data: DataSettings
    model: MAEConfig = MAEConfig()
    masking: MaskerSpec = RandomMasker(ratio=0.75)

    @model_validator(mode="after")
    def _crop_matches_model(self) -> MAEJob:
        check_crop_matches_model(self.data, self.model.encoder.img_size)
        return self


class MAETask(TrainTask):
    """MAE-3D on served crops with a masker from the config."""

    kind = "mae"
    job: MAEJob

    def build_model(self) -> nn.Module:
        return build_mae3d(self.job.model)

    @property
    def masker(self) -> Masker:
        return self.job.masking

    def batches(self, start_step: int) -> Iterator[dict[str, Any]]:
        run = self.job.run
        return crop_batches(
            self.job.data,
            self.worker.extras["pool"],
            rank=self.worker.rank,
            batch_size=run.batch_size,
            steps_per_epoch=run.steps_per_epoch,
            start_step=start_step,
        )

    def token_grid(self, model: nn.Module) -> tuple[int, int, int]:
        encoder = unwrap(model).encoder
        return tuple(
            s // p for s, p in zip(self.job.model.encoder.img_size, encoder.patch_size, strict=True)
        )

    def masks(self, model: nn.Module, batch_size: int, step: int) -> np.ndarray:
        """Masks for one step: seeded by (seed, rank, step), so a resumed run draws the same."""
        rng = np.random.default_rng(
            np.random.SeedSequence([self.job.run.seed, self.worker.rank, step, 2])
        )
        return self.masker.mask((batch_size, *self.token_grid(model)), rng)

    def loss(
        self, model: nn.Module, batch: dict[str, Any], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        image = batch["image"]
        mask = self.masks(model, len(image), step)
        out = model(image, torch.from_numpy(mask).to(image.device))
        scalars = {f"loss_{name}": float(value.detach()) for name, value in out.losses.items()}
        scalars["mask_ratio"] = float(mask.mean())
        return out.loss, scalars

    def previews(self, model: nn.Module, batch: dict[str, Any], step: int) -> dict[str, np.ndarray]:
        return {
            "pretrain/input_mask_reconstruction": mae_preview(
                model, batch["image"][:1], self.masks(model, 1, step)
            )
        }


def mae_preview(model: MAE3D, image: torch.Tensor, mask: np.ndarray) -> np.ndarray:
    """Middle z-slice of one crop: input | input with hidden patches darkened | reconstruction."""
    model.eval()
    recon = model.reconstruct(image, torch.from_numpy(mask).to(image.device))
    model.train()
    volume = image[0, 0].float().cpu().numpy()
    z = volume.shape[0] // 2
    patch = model.encoder.patch_size
    voxel_mask = np.kron(mask[0], np.ones(patch, dtype=bool))[z]
    hidden = np.where(voxel_mask, volume[z] * 0.25, volume[z])
    tiles = [to_grey(volume[z]), to_grey(hidden), to_grey(recon[0, 0, z].cpu().numpy())]
    return grid(tiles)


def pretrain(job: MAEJob, task_class: type[TrainTask] = MAETask) -> Any:
    """Start chunk servers for ``job.data`` and run the pretraining; returns Ray's Result.

    ``neuroray pretrain mae`` runs this with the default task (see :mod:`neuroray.trainers.methods`).
    """
    return run_with_pool(task_class, job)
