"""Fine-tuning a UNETR for segmentation on Ray Train: EM neurons, mitochondria, LM neurons.

- ``em``: 3 (or more) affinity channels from instance labels (trainers see
  :func:`~neuroray.segmentation.targets.seg_to_affinities`), class-balanced BCE; validation
  segments a held-out region with waterz and reports VOI split / merge and ARAND.
- ``mito`` / ``lm``: one foreground channel (labels > 0), balanced BCE + soft Dice; validation
  reports Dice and IoU.

The encoder starts from scratch, from any neuroray pretraining checkpoint (MAE, dbMiM, MS-Con;
its architecture is read from the checkpoint), or from a 2D natural-image ViT inflated to 3D
(``timm:<name>`` or ``file:<path>``, METHODS.md §3).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from neuroray.config import StrictModel
from neuroray.errors import ConfigError
from neuroray.models.unetr import UNETR, load_encoder, param_groups_lrd
from neuroray.models.vit3d import ViTConfig, build_vit3d
from neuroray.paths import ModelInit
from neuroray.platform.box import Box
from neuroray.platform.volume import open_volume
from neuroray.preview import grid, overlay, to_grey
from neuroray.segmentation.inference import predict_array, segment_affinities, segment_binary
from neuroray.segmentation.metrics import dice, evaluate_segmentation, iou
from neuroray.segmentation.targets import (
    NEAREST_OFFSETS,
    balance_weights,
    grow_boundary,
    seg_to_affinities,
)
from neuroray.trainers.data import (
    DataSettings,
    check_crop_matches_model,
    crop_batches,
    run_with_pool,
)
from neuroray.trainers.loop import TrainJob, TrainTask, load_model_checkpoint

FinetuneTask = Literal["em", "mito", "lm"]


class FinetuneModel(StrictModel):
    """The UNETR and where its encoder comes from."""

    encoder: ViTConfig = ViTConfig(pos_embed="learned")
    feature_size: int = Field(16, ge=1)
    skip_connections: bool = True
    init: ModelInit = "scratch"
    """scratch | checkpoint:<neuroray run, checkpoint dir or model.pt> | timm:<2D ViT name> |
    file:<2D ViT weights (.safetensors/.pth/.npz)>"""
    inflate: Literal["center", "average"] = "center"
    """How a 2D patch embedding becomes 3D (timm:/file: inits only)."""
    freeze_encoder_steps: int = Field(0, ge=0)
    """Train only the decoder for this many steps first (encoder lr 0)."""

    @model_validator(mode="after")
    def _known_init(self) -> FinetuneModel:
        kind = self.init.split(":", 1)[0]
        if self.init != "scratch" and (
            kind not in ("checkpoint", "timm", "file") or ":" not in self.init
        ):
            raise ValueError(
                f"model.init {self.init!r} must be 'scratch', 'checkpoint:<path>', "
                "'timm:<name>' or 'file:<path>'"
            )
        return self


class TargetSettings(StrictModel):
    offsets: list[tuple[int, int, int]] = [tuple(o) for o in NEAREST_OFFSETS]
    background: Literal["boundary", "unknown"] = "boundary"
    """Label 0 is a boundary (a known cut) or unknown (edges touching it are ignored)."""
    grow_boundary: int = Field(0, ge=0)
    """Erode objects by this many voxels in y, x first (thin boundaries become learnable)."""
    balance: bool = True
    dice_weight: float = Field(1.0, ge=0)
    """Soft-Dice term for binary tasks (mito, lm)."""


class ValidationSettings(StrictModel):
    """A held-out region of the training layers (not the test region) scored at checkpoints."""

    roi: tuple[int, int, int, int, int, int] | None = None
    thresholds: list[float] = [0.1, 0.25, 0.4, 0.55, 0.7, 0.85]
    """waterz merge thresholds tried (EM); the best by VOI is reported with its threshold."""
    binary_threshold: float = Field(0.5, gt=0, lt=1)


class FinetuneJob(TrainJob):
    task: FinetuneTask = "em"
    data: DataSettings
    model: FinetuneModel = FinetuneModel()
    targets: TargetSettings = TargetSettings()
    validation: ValidationSettings = ValidationSettings()

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneJob:
        if not self.data.labels:
            raise ValueError("fine-tuning needs data.labels (an aligned label layer)")
        check_crop_matches_model(self.data, self.model.encoder.img_size)
        return self

    @property
    def out_channels(self) -> int:
        return len(self.targets.offsets) if self.task == "em" else 1


# ---------------------------------------------------------------------- building the model
def encoder_config_from_checkpoint(path: str, img_size: tuple[int, int, int]) -> ViTConfig:
    """The architecture of a pretraining checkpoint's encoder, at this job's crop size."""
    import json

    checkpoint = load_model_checkpoint(path)
    job = json.loads(checkpoint["job"])
    encoder = job.get("model", {}).get("encoder")
    if encoder is None:
        raise ConfigError(f"checkpoint {path} has no model.encoder section to copy")
    return ViTConfig.model_validate({**encoder, "img_size": list(img_size)})


def build_segmenter(job: FinetuneJob) -> tuple[UNETR, str, ViTConfig]:
    """The UNETR of a job with its encoder initialised, a one-line report, and the encoder's
    actual architecture (from the checkpoint or 2D model when initialised from one)."""
    model_cfg = job.model
    kind, _, source = model_cfg.init.partition(":")
    if kind == "checkpoint":
        encoder_cfg = encoder_config_from_checkpoint(source, model_cfg.encoder.img_size)
        encoder = build_vit3d(encoder_cfg)
        checkpoint = load_model_checkpoint(source)
        report = load_encoder(
            encoder, checkpoint["state_dict"], prefix=checkpoint["encoder_prefix"]
        )
        note = f"encoder from {checkpoint['kind']} checkpoint step {checkpoint['step']}: {report.summary()}"
        model_cfg = model_cfg.model_copy(update={"encoder": encoder_cfg})
    elif kind in ("timm", "file"):
        from neuroray.models.transfer import encoder_from_2d

        encoder, transfer = encoder_from_2d(
            model_cfg.init,
            img_size=model_cfg.encoder.img_size,
            patch_size=model_cfg.encoder.patch_size,
            inflate=model_cfg.inflate,
        )
        note = f"encoder inflated ({model_cfg.inflate}) from {model_cfg.init}: {transfer.summary()}"
        model_cfg = model_cfg.model_copy(update={"encoder": transfer.config})
    else:
        encoder = build_vit3d(model_cfg.encoder)
        note = "encoder from scratch"
    model = UNETR(
        encoder,
        out_channels=job.out_channels,
        skip_connections=model_cfg.skip_connections,
        feature_size=model_cfg.feature_size,
    )
    return model, note, model_cfg.encoder


# ---------------------------------------------------------------------- targets
def em_targets(labels: np.ndarray, targets: TargetSettings) -> tuple[np.ndarray, np.ndarray]:
    """Affinities [C, z, y, x] and per-edge weights (mask x class balance) for one crop."""
    if targets.grow_boundary:
        labels = grow_boundary(labels, targets.grow_boundary, only_xy=True)
    affs, mask = seg_to_affinities(labels, targets.offsets, background=targets.background)
    weights = balance_weights(affs, mask) if targets.balance else mask
    return affs, weights


def binary_targets(labels: np.ndarray, balance: bool) -> tuple[np.ndarray, np.ndarray]:
    """Foreground [1, z, y, x] and weights that give both classes equal total weight.

    The foreground fraction is floored at 5% (a foreground voxel weighs at most 10): LM neurons
    cover 0.01-1% of a crop, and weighting them 100-5000x makes the 0.5 threshold flood the
    background with false positives.
    """
    target = (labels > 0).astype(np.float32)[None]
    if not balance:
        return target, np.ones_like(target)
    fraction = float(np.clip(target.mean(), 0.05, 0.95))
    weights = np.where(target > 0, 0.5 / fraction, 0.5 / (1 - fraction)).astype(np.float32)
    return target, weights


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    prob = torch.sigmoid(logits.float())
    dims = tuple(range(1, prob.ndim))
    overlap = (prob * target).sum(dims)
    return (1 - (2 * overlap + eps) / (prob.sum(dims) + target.sum(dims) + eps)).mean()


# ---------------------------------------------------------------------- the task
class SegmentationTask(TrainTask):
    """Fine-tuning on served image + label crops; validation segments a held-out region."""

    job: FinetuneJob

    @property
    def kind(self) -> str:  # type: ignore[override]
        return f"finetune_{self.job.task}"

    def build_model(self) -> nn.Module:
        model, note, encoder = build_segmenter(self.job)
        # checkpoints record the architecture actually built, so they reload without the source
        self.job = self.job.model_copy(
            update={"model": self.job.model.model_copy(update={"encoder": encoder})}
        )
        if self.worker.is_chief:
            print(f"[neuroray] {note}", flush=True)
        return model

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        optim = self.job.optim
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
            if self.job.task == "em":
                pairs = [em_targets(lab, self.job.targets) for lab in labels]
            else:
                pairs = [binary_targets(lab, self.job.targets.balance) for lab in labels]
            batch["target"] = torch.from_numpy(np.stack([t for t, _ in pairs]))
            batch["weight"] = torch.from_numpy(np.stack([w for _, w in pairs]))
            yield batch

    def loss(
        self, model: nn.Module, batch: dict[str, Any], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(batch["image"]).float()
        target, weight = batch["target"], batch["weight"]
        bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum")
        bce = bce / weight.sum().clamp_min(1.0)
        scalars = {"loss_bce": float(bce.detach())}
        loss = bce
        if self.job.task != "em" and self.job.targets.dice_weight > 0:
            dice_term = soft_dice_loss(logits, target)
            loss = loss + self.job.targets.dice_weight * dice_term
            scalars["loss_dice"] = float(dice_term.detach())
        return loss, scalars

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
                image.read(box).astype(np.float32)
                / np.float32(np.iinfo(image.dtype).max if image.dtype.kind == "u" else 1),
                labels.read(box),
                image.voxel_size,
            )
        return self._val

    def validate(self, model: nn.Module, step: int) -> dict[str, float]:
        arrays = self._validation_arrays()
        if arrays is None:
            return {}
        image, labels, voxel_size = arrays
        probs = predict_array(
            model, image, self.job.model.encoder.img_size, device=self.worker.device
        )
        return score_prediction(self.job, probs, labels, voxel_size)

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
    if job.task == "em":
        best: dict[str, float] | None = None
        for threshold, seg in segment_affinities(
            probs, job.validation.thresholds, voxel_size=voxel_size
        ).items():
            scores = evaluate_segmentation(seg, labels)
            if best is None or scores.voi < best["val_voi"]:
                best = {
                    "val_voi": scores.voi,
                    "val_voi_split": scores.voi_split,
                    "val_voi_merge": scores.voi_merge,
                    "val_arand": scores.arand,
                    "val_cremi_score": scores.cremi_score,
                    "val_threshold": float(threshold),
                }
        return best or {}
    mask = segment_binary(probs[0], job.validation.binary_threshold)
    truth = labels > 0
    return {"val_dice": dice(mask, truth), "val_iou": iou(mask, truth)}


def finetune(job: FinetuneJob) -> Any:
    """Start chunk servers for the image + labels and fine-tune; returns Ray's Result."""
    if job.model.init.startswith(("checkpoint:", "file:")):
        build_segmenter(job)  # a bad checkpoint or weights file fails here, before Ray starts
    return run_with_pool(SegmentationTask, job)


JOB_CLASS = FinetuneJob


def run_job(job: FinetuneJob) -> Any:
    """The CLI's entry point (``neuroray finetune em|mito|lm``)."""
    return finetune(job)
