"""Occlusions and EM section artefacts (image only): cutout, missing / partially missing and
low-contrast sections, motion blur."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from neuroray.platform.augment.base import (
    Count,
    Fill,
    FractionInterval,
    NonNegativeInterval,
    Sample,
    Transform,
    TransformParams,
    _count,
    _fill_value,
    _uniform,
    registered,
)

# --- occlusions and EM section artefacts (image only) ------------------------------------------


class CutoutParams(TransformParams):
    count: Count = (1, 3)
    size: FractionInterval = (0.1, 0.3)
    """Box extent along each axis as a fraction of the crop's extent."""
    fill: Fill = 0.0


@registered
class Cutout(Transform):
    """Set random boxes of the image to a fill value (labels untouched: the net must infer)."""

    name = "cutout"
    Params = CutoutParams

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        image = sample.image.copy()
        fill = _fill_value(sample.image, self.params.fill)
        for _ in range(_count(rng, self.params.count)):
            box = []
            for n in sample.shape:
                extent = max(1, round(_uniform(rng, self.params.size) * n))
                start = int(rng.integers(0, n - extent + 1)) if extent < n else 0
                box.append(slice(start, start + extent))
            image[(..., *box)] = fill
        return sample.replace(image=image)


class SectionParams(TransformParams):
    count: Count = (1, 2)
    """How many z-sections are hit (at most the crop's depth)."""


def _pick_sections(rng: np.random.Generator, sample: Sample, count: tuple[int, int]) -> np.ndarray:
    depth = sample.shape[0]
    return np.sort(rng.choice(depth, size=_count(rng, count, most=depth), replace=False))


class MissingSectionsParams(SectionParams):
    fill: Fill = 0.0


@registered
class MissingSections(Transform):
    """Replace whole z-sections by a fill value (lost or unusable sections)."""

    name = "missing_sections"
    Params = MissingSectionsParams

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        image = sample.image.copy()
        sections = _pick_sections(rng, sample, self.params.count)
        image[..., sections, :, :] = _fill_value(sample.image, self.params.fill)
        return sample.replace(image=image)


class PartiallyMissingParams(SectionParams):
    width: NonNegativeInterval = (4.0, 32.0)
    """Width of the missing band in voxels."""
    fill: Fill = 0.0


@registered
class PartiallyMissingSections(Transform):
    """Blank a straight band at a random angle in some sections (cracks, partial section loss)."""

    name = "partially_missing_sections"
    Params = PartiallyMissingParams

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        image = sample.image.copy()
        fill = _fill_value(sample.image, self.params.fill)
        _, height, width = sample.shape
        y = np.arange(height, dtype=np.float32)[:, None]
        x = np.arange(width, dtype=np.float32)[None, :]
        for z in _pick_sections(rng, sample, self.params.count):
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            angle = rng.uniform(0, np.pi)
            band = _uniform(rng, self.params.width) / 2
            distance = np.abs((y - cy) * np.cos(angle) - (x - cx) * np.sin(angle))
            image[..., z, :, :][..., distance <= band] = fill
        return sample.replace(image=image)


class LowContrastParams(SectionParams):
    factor: NonNegativeInterval = (0.1, 0.5)
    """Contrast left in the hit sections (gunpowder's DefectAugment contrast_scale)."""


@registered
class LowContrastSections(Transform):
    """Flatten the contrast of some z-sections about their mean (poorly stained sections)."""

    name = "low_contrast_sections"
    Params = LowContrastParams

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        image = sample.image.copy()
        for z in _pick_sections(rng, sample, self.params.count):
            section = image[..., z, :, :]
            mean = section.mean(axis=(-2, -1), keepdims=True)
            factor = np.float32(_uniform(rng, self.params.factor))
            image[..., z, :, :] = mean + (section - mean) * factor
        return sample.replace(image=image)


class MotionBlurParams(SectionParams):
    length: Count = (3, 9)
    """Length in voxels of the straight blur kernel, along y or x (drawn per section)."""


@registered
class MotionBlur(Transform):
    """Blur some z-sections along y or x with a line kernel (stage drift during imaging)."""

    name = "motion_blur"
    Params = MotionBlurParams

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        image = sample.image.copy()
        for z in _pick_sections(rng, sample, self.params.count):
            length = max(1, _count(rng, self.params.length, most=max(sample.shape[1:])))
            axis = -2 if rng.random() < 0.5 else -1
            image[..., z, :, :] = ndimage.uniform_filter1d(
                sample.image[..., z, :, :], size=length, axis=axis, mode="reflect"
            )
        return sample.replace(image=image)
