"""Fine-tuning a segmenter on Ray Train: EM neurons, mitochondria, LM neurons.

The segmenter is a registered architecture (:data:`neuroray.models.segmenter.SEGMENTERS`):
``unetr`` (a ViT3D encoder + convolutional decoder) or ``unet`` (a residual 3D U-Net from scratch).

What each task predicts, its targets, loss and validation metrics come from the task registry
(:mod:`neuroray.segmentation.tasks`): ``em`` affinities scored by VOI / ARAND after waterz,
``mito`` / ``lm`` foreground masks scored by Dice / IoU.

UNETR's encoder starts from scratch, from any neuroray pretraining checkpoint (MAE, dbMiM, MS-Con;
its architecture is read from the checkpoint), or from a 2D natural-image ViT inflated to 3D
(``timm:<name>`` or ``file:<path>``, METHODS.md §3): one path, :mod:`neuroray.models.encoder_init`,
built by the segmenter factory in :mod:`neuroray.models.segmenter`.

The threshold validation chose (waterz merge threshold, foreground cut) is stored in each
checkpoint, and ``segment`` uses it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from neuroray.models.segmenter import SEGMENTERS, SegmenterConfig, build_segmenter
from neuroray.models.unetr import param_groups_lrd
from neuroray.platform.augment import as_float_image
from neuroray.platform.box import Box
from neuroray.platform.volume import open_volume
from neuroray.preview import grid, overlay, to_grey
from neuroray.segmentation.inference import predict_array
from neuroray.segmentation.tasks import TargetSettings, TaskName, ValidationSettings, get_task
from neuroray.trainers.data import (
    DataSettings,
    check_crop_matches_model,
    crop_batches,
    run_with_pool,
)
from neuroray.trainers.loop import TrainTask
from neuroray.trainers.settings import TrainJob


class FinetuneModel(SegmenterConfig):
    """The segmenter (``name``, default UNETR; models/segmenter.py) and where its encoder comes
    from (``init``, ``inflate``, ``keep_cls_token``, ``fold_normalization``, ``num_heads``:
    models/encoder_init.py), plus how fine-tuning treats it."""

    freeze_encoder_steps: int = Field(0, ge=0)
    """Train only the decoder for this many steps first (encoder lr 0)."""


class FinetuneJob(TrainJob):
    task: TaskName = "em"
    """A registered segmentation task (segmentation/tasks.py): em, mito, lm."""
    data: DataSettings
    model: FinetuneModel = FinetuneModel()
    targets: TargetSettings = TargetSettings()
    validation: ValidationSettings = ValidationSettings()

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneJob:
        if not self.data.labels:
            raise ValueError("fine-tuning needs data.labels (an aligned label layer)")
        if self.model.window is None:
            # a fully convolutional network runs on the crop it is trained on
            self.model = self.model.with_window(tuple(self.data.sampler.crop_shape))
        check_crop_matches_model(self.data, self.model.window, self.model.window_key)
        return self

    @property
    def out_channels(self) -> int:
        return get_task(self.task).out_channels(self.targets)


# ---------------------------------------------------------------------- the task
class SegmentationTask(TrainTask):
    """Fine-tuning on served image + label crops; validation segments a held-out region."""

    job: FinetuneJob

    @property
    def kind(self) -> str:  # type: ignore[override]
        return f"finetune_{self.job.task}"

    def build_model(self) -> nn.Module:
        model, note, built = build_segmenter(self.job.model, self.job.out_channels)
        # checkpoints record the architecture actually built, so they reload without the source
        self.job = self.job.model_copy(update={"model": built})
        if self.worker.is_chief:
            print(f"[neuroray] {note}", flush=True)
        return model

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        optim = self.job.optim
        if not SEGMENTERS.get(self.job.model.name).pretrained_encoder:
            return super().param_groups(model)
        groups = param_groups_lrd(model, optim.lr, optim.weight_decay, optim.layer_decay or 1.0)
        freeze = self.job.model.freeze_encoder_steps
        if freeze:
            encoder_params = {id(p) for p in model.encoder.parameters()}
            for group in groups:
                if all(id(p) in encoder_params for p in group["params"]):
                    group["freeze_until"] = freeze
        return groups

    def batches(self, start_step: int) -> Iterator[dict[str, Any]]:
        run = self.job.run
        for batch in crop_batches(
            self.job.data,
            self.worker.extras["pool"],
            rank=self.worker.rank,
            batch_size=run.batch_size,
            steps_per_epoch=run.steps_per_epoch,
            start_step=start_step,
        ):
            labels = batch["labels"].numpy()
            task = get_task(self.job.task)
            pairs = [task.targets(lab, self.job.targets) for lab in labels]
            batch["target"] = torch.from_numpy(np.stack([t for t, _ in pairs]))
            batch["weight"] = torch.from_numpy(np.stack([w for _, w in pairs]))
            yield batch

    def loss(
        self, model: nn.Module, batch: dict[str, Any], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(batch["image"]).float()
        return get_task(self.job.task).loss(
            logits, batch["target"], batch["weight"], self.job.targets
        )

    # -------------------------------------------------------------- validation and previews
    def _validation_arrays(
        self,
    ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]] | None:
        if self.job.validation.roi is None:
            return None
        if not hasattr(self, "_val"):
            box = Box.from_list(self.job.validation.roi)
            image = open_volume(self.job.data.image)
            labels = open_volume(self.job.data.labels)
            self._val = (
                as_float_image(image.read(box)),
                labels.read(box),
                image.voxel_size,
            )
        return self._val

    def validate(self, model: nn.Module, step: int) -> dict[str, float]:
        arrays = self._validation_arrays()
        if arrays is None:
            return {}
        image, labels, voxel_size = arrays
        probs = predict_array(model, image, self.job.model.window, device=self.worker.device)
        metrics = score_prediction(self.job, probs, labels, voxel_size)
        if "val_threshold" in metrics:
            self._threshold = metrics["val_threshold"]
        return metrics

    def postprocess(self) -> dict[str, float]:
        """The threshold the latest validation chose, for ``segment`` to reuse."""
        threshold = getattr(self, "_threshold", None)
        return {} if threshold is None else {"threshold": float(threshold)}

    def previews(self, model: nn.Module, batch: dict[str, Any], step: int) -> dict[str, np.ndarray]:
        image = batch["image"][:1]
        with torch.no_grad():
            model.eval()
            prob = torch.sigmoid(model(image).float())[0].cpu().numpy()
            model.train()
        z = image.shape[2] // 2
        crop = image[0, 0, z].cpu().numpy()
        labels = batch["labels"][0, z].cpu().numpy()
        tiles = [
            to_grey(crop),
            overlay(crop, labels),
            to_grey(prob[: min(3, len(prob)), z].mean(0)),
        ]
        return {f"finetune/{self.job.task}_input_labels_prediction": grid(tiles)}


def score_prediction(
    job: FinetuneJob, probs: np.ndarray, labels: np.ndarray, voxel_size: tuple[float, float, float]
) -> dict[str, float]:
    """Validation metrics of a probability map against labels (EM: best waterz threshold)."""
    return get_task(job.task).validate(probs, labels, voxel_size, job.validation)


def finetune(job: FinetuneJob) -> Any:
    """Start chunk servers for the image + labels and fine-tune; returns Ray's Result."""
    if job.model.init.startswith(("checkpoint:", "file:")):
        # a bad checkpoint or weights file fails here, before Ray starts
        build_segmenter(job.model, job.out_channels)
    return run_with_pool(SegmentationTask, job)


JOB_CLASS = FinetuneJob


def run_job(job: FinetuneJob) -> Any:
    """The CLI's entry point (``neuroray finetune em|mito|lm``)."""
    return finetune(job)
