"""MS-Con pretraining on Ray Train: weak and strong views of served crops, a Siamese UNETR.

``neuroray pretrain mscon configs/pretrain_mscon.yaml run.steps=200`` starts chunk servers for
the image layer and a TorchTrainer (the shared loop of trainers/loop.py: checkpoints, resume,
TensorBoard). The pool serves **clean** crops (``data.augment`` stays empty); each worker draws
the views itself with the job's ``augment`` section (:class:`MSConAugmentConfig`): ``shared``
once per crop (the reconstruction target), then ``weak`` and ``strong`` from it. View randomness
is seeded by (seed, rank, step), so a resumed run draws the views it would have drawn (and, in
the fast variant, the patches the encoder sees). ``model.variant`` picks the network: ``fast``
(default; the encoder sees a quarter of the patches, a three-level decoder) or ``published``
(the paper's network, ~14x the work per sample of the fast one; see neuroray/models/mscon.py
and benchmarks/RESULTS.md).

The checkpoint holds the encoder under ``unetr.encoder.`` (``encoder_prefix`` in model.pt), which
``neuroray.models.unetr.load_encoder(unetr, state_dict, prefix=...)`` reads for fine-tuning.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from pydantic import model_validator
from torch import nn

from neuroray.models.mscon import (
    ENCODER_PREFIX,
    MSCon,
    MSConConfig,
    MSConLossConfig,
    build_mscon,
)
from neuroray.platform.augment import MSConAugmentConfig, Sample
from neuroray.preview import grid, to_grey
from neuroray.trainers.data import DataSettings, check_crop_matches_model, crop_batches
from neuroray.trainers.loop import TrainTask, unwrap
from neuroray.trainers.pretrain import pretrain
from neuroray.trainers.settings import TrainJob


class MSConJob(TrainJob):
    """An MS-Con pretraining job: data, model, loss weights, view augmentations, optimiser, run."""

    data: DataSettings
    model: MSConConfig = MSConConfig()
    loss: MSConLossConfig = MSConLossConfig()
    augment: MSConAugmentConfig = MSConAugmentConfig()

    @model_validator(mode="after")
    def _check(self) -> MSConJob:
        check_crop_matches_model(self.data, self.model.encoder.img_size)
        if self.data.augment:
            raise ValueError(
                "MS-Con draws its views on the workers from the `augment` section "
                "(augment.shared / augment.weak / augment.strong); leave data.augment empty "
                "(data.augment=[]) so the pool serves clean crops"
            )
        return self


def draw_views(
    images: torch.Tensor,
    augment: MSConAugmentConfig,
    rng: np.random.Generator,
    voxel_size: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """Clean crops [B, C, Z, Y, X] -> {"clean", "weak", "strong"}, each [B, C, Z, Y, X] float32.

    Per crop, :meth:`MSConAugmentConfig.views`: ``shared`` makes the clean target, then the weak
    and the strong view are drawn from it; one generator for the whole batch.
    """
    views: dict[str, list[np.ndarray]] = {"clean": [], "weak": [], "strong": []}
    for image in images.numpy():
        drawn = augment.views(Sample(image, voxel_size=voxel_size), rng)
        for name, sample in zip(views, drawn, strict=True):
            views[name].append(sample.image if sample.image.ndim == 4 else sample.image[None])
    return {name: torch.from_numpy(np.stack(arrays)) for name, arrays in views.items()}


class MSConTask(TrainTask):
    """MS-Con on served crops: views drawn per step, loss from :class:`MSCon`."""

    kind = "mscon"
    encoder_prefix = ENCODER_PREFIX
    job: MSConJob

    def build_model(self) -> nn.Module:
        return build_mscon(self.job.model, self.job.loss)

    def view_rng(self, step: int) -> np.random.Generator:
        """View randomness of one step, seeded by (seed, rank, step): resumes draw the same."""
        return np.random.default_rng(
            np.random.SeedSequence([self.job.run.seed, self.worker.rank, step, 3])
        )

    def keep(self, model: nn.Module, batch: dict[str, Any], step: int) -> torch.Tensor | None:
        """The patches the encoder sees this step (fast variant), seeded like the views."""
        net: MSCon = unwrap(model)  # type: ignore[assignment]
        views = batch["weak"]
        seed = np.random.SeedSequence([self.job.run.seed, self.worker.rank, step, 4])
        return net.draw_keep(
            2 * len(views),
            net.encoder.grid_of(views),
            views.device,
            torch.Generator().manual_seed(int(seed.generate_state(1)[0])),
        )

    def batches(self, start_step: int) -> Iterator[dict[str, Any]]:
        run, pool = self.job.run, self.worker.extras["pool"]
        crops = crop_batches(
            self.job.data,
            pool,
            rank=self.worker.rank,
            batch_size=run.batch_size,
            steps_per_epoch=run.steps_per_epoch,
            start_step=start_step,
        )
        for step, batch in enumerate(crops, start=start_step):
            views = draw_views(
                batch["image"], self.job.augment, self.view_rng(step), pool.voxel_size
            )
            yield {**views, "box": batch["box"]}

    def loss(
        self, model: nn.Module, batch: dict[str, Any], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(
            batch["weak"], batch["strong"], batch["clean"], keep=self.keep(model, batch, step)
        )
        scalars = {f"loss_{name}": float(value.detach()) for name, value in out.losses.items()}
        scalars["contrast_accuracy"] = out.accuracy
        return out.loss, scalars

    def previews(self, model: nn.Module, batch: dict[str, Any], step: int) -> dict[str, np.ndarray]:
        return {"pretrain/clean_weak_strong_recon-weak_recon-strong": mscon_preview(model, batch)}


def mscon_preview(model: MSCon, batch: dict[str, Any]) -> np.ndarray:
    """Middle z-slice of the first crop: clean | weak | strong | recon(weak) | recon(strong)."""
    model.eval()
    views = [batch[name][:1] for name in ("clean", "weak", "strong")]
    recons = [model.reconstruct(view) for view in views[1:]]
    model.train()
    z = views[0].shape[2] // 2
    return grid([to_grey(v[0, 0, z].float().cpu().numpy()) for v in views + recons])


def run_mscon(job: MSConJob) -> Any:
    """Run an MS-Con job (``neuroray pretrain mscon``): pool, fit, shutdown; Ray's Result."""
    return pretrain(job, task_class=MSConTask)
