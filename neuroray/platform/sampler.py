"""Random training crops: seeded locations, foreground rejection, and a torch IterableDataset.

Crop locations come from a generator seeded by (run seed, worker rank, epoch), so a resumed run
replays exactly the stream it was reading, and two workers never read the same stream.
Crops can be rejected by foreground fraction either before any voxel is read (from the labels
layer's manifest: only chunks with enough foreground are drawn from) or after reading (from the
crop's own labels).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field, PositiveInt, field_validator
from torch.utils.data import IterableDataset

from neuroray.config import StrictModel
from neuroray.errors import ConfigError
from neuroray.platform.augment import Sample, as_float_image
from neuroray.platform.box import Box
from neuroray.platform.ingest import manifest_boxes
from neuroray.platform.server import ServerPool

Augment = Callable[[Sample, np.random.Generator], Sample]

#: Crops drawn in a row without one passing ``min_foreground`` before sampling gives up.
MAX_DRAWS_PER_CROP = 1000


class SamplerConfig(StrictModel):
    """Where and how crops are drawn."""

    crop_shape: tuple[PositiveInt, PositiveInt, PositiveInt] = (32, 160, 160)
    roi: tuple[int, int, int, int, int, int] | None = None
    """Region to draw from, [z0, y0, x0, z1, y1, x1]; e.g. the training slab only."""
    min_foreground: float = Field(0.0, ge=0.0, le=1.0)
    """Reject crops whose labelled (non-zero) fraction is below this (a fraction in [0, 1])."""
    foreground_from: Literal["labels", "manifest"] = "labels"
    seed: int = 0

    @field_validator("roi")
    @classmethod
    def _roi_is_a_box(cls, roi: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if roi is not None and (
            min(roi[:3]) < 0 or any(a >= b for a, b in zip(roi[:3], roi[3:], strict=True))
        ):
            raise ValueError("roi is [z0, y0, x0, z1, y1, x1] with 0 <= start < stop on every axis")
        return roi


class CropSampler:
    """Draws crop boxes inside a region, deterministically per (seed, rank, epoch)."""

    def __init__(
        self,
        bounds: Box,
        crop_shape: tuple[int, int, int],
        *,
        seed: int = 0,
        roi: Box | None = None,
        min_foreground: float = 0.0,
        manifest: pa.Table | None = None,
        max_draws_per_crop: int = MAX_DRAWS_PER_CROP,
    ) -> None:
        self.region = bounds if roi is None else roi.intersect(bounds)
        self.crop_shape = tuple(int(c) for c in crop_shape)
        self.seed = seed
        if not 0.0 <= min_foreground <= 1.0:
            raise ConfigError(
                f"sampler.min_foreground is a fraction in [0, 1], got {min_foreground}"
            )
        if min(self.crop_shape) <= 0:
            raise ConfigError(f"sampler.crop_shape must be positive, got {self.crop_shape}")
        self.min_foreground = min_foreground
        self.max_draws_per_crop = int(max_draws_per_crop)
        if any(c > r for c, r in zip(self.crop_shape, self.region.shape, strict=True)):
            raise ConfigError(
                f"crop shape {self.crop_shape} does not fit in the sampling region {self.region} "
                f"(shape {self.region.shape}); use a smaller sampler.crop_shape or a larger roi"
            )
        self.candidates: list[Box] | None = None
        if manifest is not None and min_foreground > 0:
            self.candidates = self._chunks_with_foreground(manifest, min_foreground)

    def _chunks_with_foreground(self, manifest: pa.Table, threshold: float) -> list[Box]:
        fractions = manifest.column("foreground_fraction").to_numpy(zero_copy_only=False)
        if np.isnan(fractions.astype(float)).all():
            raise ConfigError(
                "foreground_from='manifest' needs the labels layer's manifest (its chunks have "
                "foreground fractions); this manifest belongs to an image layer"
            )
        kept = [
            box.intersect(self.region)
            for box, fraction in zip(manifest_boxes(manifest), fractions, strict=True)
            if fraction >= threshold and not box.intersect(self.region).empty
        ]
        if not kept:
            raise ConfigError(
                f"no chunk in {self.region} has a foreground fraction >= {threshold}; "
                "lower sampler.min_foreground"
            )
        return kept

    def rng(self, rank: int, epoch: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, rank, epoch]))

    def draw(self, rng: np.random.Generator) -> Box:
        """One crop box.

        With manifest candidates the crop is centred on a random voxel of a kept chunk (shifted
        inward at the region's edges), so it always overlaps that chunk.
        """
        lo = np.asarray(self.region.start)
        hi = np.asarray(self.region.stop) - np.asarray(self.crop_shape)
        if self.candidates is None:
            start = rng.integers(lo, hi + 1)
        else:
            chunk = self.candidates[rng.integers(len(self.candidates))]
            centre = rng.integers(chunk.start, chunk.stop)
            start = np.clip(centre - np.asarray(self.crop_shape) // 2, lo, hi)
        return Box.from_shape(self.crop_shape, start)

    def boxes(self, rank: int, epoch: int) -> Iterator[Box]:
        """An endless, reproducible stream of boxes for one worker and epoch."""
        rng = self.rng(rank, epoch)
        while True:
            yield self.draw(rng)

    def accepts(self, labels: np.ndarray | None) -> bool:
        if self.min_foreground <= 0 or labels is None or self.candidates is not None:
            return True
        return np.count_nonzero(labels) / labels.size >= self.min_foreground

    def check_rejections(self, rejected: int) -> None:
        """Give up once ``rejected`` crops in a row failed ``min_foreground`` (a threshold no
        crop reaches would otherwise spin forever)."""
        if rejected >= self.max_draws_per_crop:
            raise ConfigError(
                f"{rejected} crops in a row from {self.region} had a foreground fraction below "
                f"sampler.min_foreground={self.min_foreground}; lower sampler.min_foreground, "
                "or set sampler.foreground_from=manifest to draw only from chunks whose "
                "labels reach it"
            )


class CropDataset(IterableDataset):
    """Crops for one Ray Train worker, pulled from a :class:`ServerPool` with prefetch.

    Yields ``{"image": float32 [C, z, y, x] in [0, 1], "labels": int64 [z, y, x] (if served),
    "box": int64 [6]}``, augmented by ``augment`` (e.g. ``augment.build_pipeline("em")``). ``samples_per_epoch`` counts accepted crops per worker. ``state_dict`` records
    the epoch and how many samples were consumed, so a resumed worker continues the same stream.
    """

    def __init__(
        self,
        pool: ServerPool,
        sampler: CropSampler,
        *,
        samples_per_epoch: int,
        rank: int = 0,
        crops_per_request: int = 16,
        prefetch: int = 4,
        augment: Augment | None = None,
        image_layer: str = "image",
        labels_layer: str | None = "labels",
    ) -> None:
        super().__init__()
        self.pool = pool
        self.sampler = sampler
        self.samples_per_epoch = samples_per_epoch
        self.rank = rank
        self.crops_per_request = crops_per_request
        self.prefetch = prefetch
        self.augment = augment
        self.image_layer = image_layer
        self.labels_layer = labels_layer if labels_layer in pool.layers else None
        self.epoch = 0
        self.consumed = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.consumed = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])

    def _requests(self) -> Iterator[list[Box]]:
        boxes = self.sampler.boxes(self.rank, self.epoch)
        while True:
            yield [next(boxes) for _ in range(self.crops_per_request)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        sent: deque[list[Box]] = deque()

        def requests() -> Iterator[list[Box]]:
            for request in self._requests():
                sent.append(request)
                yield request

        accepted = rejected = 0
        for batch in self.pool.stream(requests(), max_in_flight=self.prefetch):
            boxes = sent.popleft()
            images = batch[self.image_layer]
            labels = batch.get(self.labels_layer) if self.labels_layer else None
            for i in range(len(images)):
                crop_labels = None if labels is None else labels[i]
                if not self.sampler.accepts(crop_labels):
                    rejected += 1
                    self.sampler.check_rejections(rejected)
                    continue
                rejected = 0
                accepted += 1
                if accepted <= self.consumed:  # replaying up to where a resumed run stopped
                    continue
                self.consumed = accepted  # counted when handed out, as a checkpoint sees it
                yield self._sample(images[i], crop_labels, boxes[i], self._augment_rng(accepted))
                if accepted >= self.samples_per_epoch:
                    return

    def _augment_rng(self, accepted: int) -> np.random.Generator:
        """Augmentation randomness of the n-th accepted crop of (rank, epoch), apart from the
        locations: seeded per sample, so a run resumed mid-epoch augments as it would have."""
        return np.random.default_rng(
            np.random.SeedSequence([self.sampler.seed, self.rank, self.epoch, 1, accepted])
        )

    def _sample(
        self, image: np.ndarray, labels: np.ndarray | None, box: Box, rng: np.random.Generator
    ) -> dict[str, Any]:
        image = as_float_image(image)  # uint8 -> [0, 1]; copies out of Ray's read-only memory
        if self.augment is not None:
            augmented = self.augment(Sample(image, labels, voxel_size=self.pool.voxel_size), rng)
            image, labels = augmented.image, augmented.labels
        if image.ndim == 3:
            image = image[None]
        sample = {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "box": torch.tensor(box.to_list()),
        }
        if labels is not None:
            sample["labels"] = torch.from_numpy(np.ascontiguousarray(labels).astype(np.int64))
        return sample


def build_sampler(
    pool: ServerPool, config: SamplerConfig, manifest: pa.Table | None = None
) -> CropSampler:
    return CropSampler(
        pool.bounds,
        config.crop_shape,
        seed=config.seed,
        roi=Box.from_list(config.roi) if config.roi else None,
        min_foreground=config.min_foreground,
        manifest=manifest if config.foreground_from == "manifest" else None,
    )
