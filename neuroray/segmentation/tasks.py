"""Segmentation tasks by name: what a network predicts for each, how it learns, how it is scored.

One registry, :data:`TASKS` (``em``, ``mito``, ``lm``; a new task is one more registration).
Each :class:`Task` names its output channels, its training targets and loss, how a
prediction becomes a segmentation (agglomeration or a threshold), its validation metrics with
their direction, and its evaluation metrics. Fine-tuning, blockwise segmentation, ``evaluate``,
sweeps and the CLI read it, so no module branches on a task's name.

- ``em``: affinity channels (one per offset) from instance labels, class-balanced BCE;
  validation segments a held-out region with waterz at each threshold and keeps the best VOI.
- ``mito`` / ``lm``: one foreground channel (labels > 0), balanced BCE + soft Dice; Dice / IoU.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
from pydantic import AfterValidator, Field

from neuroray.config import StrictModel
from neuroray.registry import Registry
from neuroray.segmentation.metrics import dice, evaluate_segmentation, iou
from neuroray.segmentation.targets import (
    NEAREST_OFFSETS,
    balance_weights,
    grow_boundary,
    seg_to_affinities,
)

if TYPE_CHECKING:
    import torch

VoxelSize = tuple[float, float, float]


class TargetSettings(StrictModel):
    """How labels become training targets."""

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
    binary_thresholds: list[Annotated[float, Field(gt=0, lt=1)]] = [t / 10 for t in range(1, 10)]
    """Foreground cuts tried (mito, lm); the best by Dice is reported with its threshold."""


# ---------------------------------------------------------------------- targets and losses
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
    import torch

    prob = torch.sigmoid(logits.float())
    dims = tuple(range(1, prob.ndim))
    overlap = (prob * target).sum(dims)
    return (1 - (2 * overlap + eps) / (prob.sum(dims) + target.sum(dims) + eps)).mean()


def balanced_bce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """BCE weighted per voxel, normalised by the total weight (masked voxels count 0)."""
    import torch.nn.functional as F

    bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum")
    return bce / weight.sum().clamp_min(1.0)


# ---------------------------------------------------------------------- the tasks
class Task(ABC):
    """A kind of segmentation: its prediction, targets, loss, post-processing and scores."""

    name: str = ""
    help: str = ""
    prediction_layer: str = ""
    """Name of the prediction layer blockwise segmentation writes (affinities, probabilities)."""
    instances: bool = False
    """Whether segmentations hold object ids (agglomerated) rather than a foreground mask."""
    validation_metrics: dict[str, Literal["min", "max"]] = {}
    """Metrics reported at validation, and whether lower or higher is better. Validation also
    reports ``val_threshold``: the post-processing threshold it chose (stored in checkpoints)."""
    default_metric: str = ""

    @abstractmethod
    def out_channels(self, targets: TargetSettings) -> int: ...

    @abstractmethod
    def targets(
        self, labels: np.ndarray, settings: TargetSettings
    ) -> tuple[np.ndarray, np.ndarray]:
        """Training target [C, z, y, x] and per-voxel weights of one label crop."""

    def loss(
        self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
        settings: TargetSettings,
    ) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
        bce = balanced_bce(logits, target, weight)
        return bce, {"loss_bce": float(bce.detach())}

    @abstractmethod
    def validate(
        self,
        probs: np.ndarray,
        labels: np.ndarray,
        voxel_size: VoxelSize,
        settings: ValidationSettings,
    ) -> dict[str, float]:
        """Validation metrics (``val_*``) of a probability map against labels."""

    @abstractmethod
    def evaluate(
        self,
        segmentation: np.ndarray,
        labels: np.ndarray,
        *,
        voxel_size: VoxelSize = (1.0, 1.0, 1.0),
        border_threshold_nm: float | None = None,
    ) -> dict[str, float]:
        """Metrics of a finished segmentation against ground truth (``neuroray evaluate``)."""


TASKS: Registry[Task] = Registry("segmentation task")


def get_task(name: str) -> Task:
    """The registered task ``name`` (a RegistryError naming the closest one otherwise)."""
    return TASKS.get(name)


def task_names() -> list[str]:
    return TASKS.names()


class AffinityTask(Task):
    """Neurons as instances: affinities, then fragments + waterz agglomeration; VOI / ARAND."""

    prediction_layer = "affinities"
    instances = True
    validation_metrics = {
        "val_voi": "min",
        "val_voi_split": "min",
        "val_voi_merge": "min",
        "val_arand": "min",
        "val_cremi_score": "min",
    }
    default_metric = "val_voi"

    def out_channels(self, targets: TargetSettings) -> int:
        return len(targets.offsets)

    def targets(
        self, labels: np.ndarray, settings: TargetSettings
    ) -> tuple[np.ndarray, np.ndarray]:
        return em_targets(labels, settings)

    def validate(
        self,
        probs: np.ndarray,
        labels: np.ndarray,
        voxel_size: VoxelSize,
        settings: ValidationSettings,
    ) -> dict[str, float]:
        from neuroray.segmentation.inference import segment_affinities

        best: dict[str, float] | None = None
        for threshold, seg in segment_affinities(
            probs, settings.thresholds, voxel_size=voxel_size
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

    def evaluate(
        self,
        segmentation: np.ndarray,
        labels: np.ndarray,
        *,
        voxel_size: VoxelSize = (1.0, 1.0, 1.0),
        border_threshold_nm: float | None = None,
    ) -> dict[str, float]:
        scores = evaluate_segmentation(
            segmentation, labels, border_threshold_nm=border_threshold_nm, voxel_size=voxel_size
        )
        return {
            "voi_split": scores.voi_split,
            "voi_merge": scores.voi_merge,
            "voi": scores.voi,
            "arand": scores.arand,
            "cremi_score": scores.cremi_score,
        }


class BinaryTask(Task):
    """A foreground mask (one channel): balanced BCE + soft Dice; Dice / IoU."""

    prediction_layer = "probabilities"
    instances = False
    validation_metrics = {"val_dice": "max", "val_iou": "max"}
    default_metric = "val_dice"

    def out_channels(self, targets: TargetSettings) -> int:
        return 1

    def targets(
        self, labels: np.ndarray, settings: TargetSettings
    ) -> tuple[np.ndarray, np.ndarray]:
        return binary_targets(labels, settings.balance)

    def loss(
        self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
        settings: TargetSettings,
    ) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
        loss, scalars = super().loss(logits, target, weight, settings)
        if settings.dice_weight > 0:
            dice_term = soft_dice_loss(logits, target)
            loss = loss + settings.dice_weight * dice_term
            scalars["loss_dice"] = float(dice_term.detach())
        return loss, scalars

    def validate(
        self,
        probs: np.ndarray,
        labels: np.ndarray,
        voxel_size: VoxelSize,
        settings: ValidationSettings,
    ) -> dict[str, float]:
        from neuroray.segmentation.inference import segment_binary

        truth = labels > 0
        best: dict[str, float] = {}
        for threshold in settings.binary_thresholds:
            mask = segment_binary(probs[0], threshold)
            score = dice(mask, truth)
            if not best or score > best["val_dice"]:
                best = {"val_dice": score, "val_iou": iou(mask, truth), "val_threshold": threshold}
        return best

    def evaluate(
        self,
        segmentation: np.ndarray,
        labels: np.ndarray,
        *,
        voxel_size: VoxelSize = (1.0, 1.0, 1.0),
        border_threshold_nm: float | None = None,
    ) -> dict[str, float]:
        prediction, truth = segmentation > 0, labels > 0
        return {"dice": dice(prediction, truth), "iou": iou(prediction, truth)}


def _register(name: str, help_text: str, task_class: type[Task]) -> None:
    task = task_class()
    task.name, task.help = name, help_text
    TASKS.register(name)(task)


_register("em", "EM neurons: affinities -> waterz, validated by VOI / ARAND", AffinityTask)
_register("mito", "mitochondria: binary masks, validated by Dice / IoU", BinaryTask)
_register("lm", "light-microscopy neurons (SWC labels): binary masks, Dice / IoU", BinaryTask)


def _check_task(name: str) -> str:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r} (known: {', '.join(task_names())})")
    return name


TaskName = Annotated[str, AfterValidator(_check_task)]
"""A config field naming a registered task."""
