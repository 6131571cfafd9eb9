"""Intensity transforms (image only, clipped to [0, 1]): contrast, brightness, gamma, noise, blur."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from neuroray.platform.augment.base import (
    Interval,
    NonNegativeInterval,
    PositiveInterval,
    Sample,
    Transform,
    TransformParams,
    _uniform,
    registered,
)

# --- intensity ----------------------------------------------------------------------------------


def _clipped(image: np.ndarray) -> np.ndarray:
    """Clip a freshly computed image to [0, 1] in place, as float32."""
    image = image.astype(np.float32, copy=False)
    return np.clip(image, 0.0, 1.0, out=image)


def _per_section(
    rng: np.random.Generator, sample: Sample, interval: tuple[float, float], per_section: bool
) -> np.ndarray | float:
    if not per_section:
        return _uniform(rng, interval)
    values = rng.uniform(interval[0], interval[1], size=sample.shape[0])
    return values.astype(np.float32)[:, None, None]


class ContrastParams(TransformParams):
    factor: NonNegativeInterval = (0.75, 1.25)
    per_section: bool = False
    """Draw a factor per z-section (EM sections vary in contrast)."""


@registered
class Contrast(Transform):
    """Scale intensities about the mean: ``mean + (x - mean) * factor``, clipped to [0, 1]."""

    name = "contrast"
    Params = ContrastParams

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        factor = _per_section(rng, sample, self.params.factor, self.params.per_section)
        image = sample.image
        axes = (-2, -1) if self.params.per_section else (-3, -2, -1)
        mean = image.mean(axis=axes, keepdims=True)
        out = (image - mean) * factor + mean
        return sample.replace(image=_clipped(out))


class BrightnessParams(TransformParams):
    shift: Interval = (-0.1, 0.1)
    per_section: bool = False


@registered
class Brightness(Transform):
    """Add a constant (per crop or per section), clipped to [0, 1]."""

    name = "brightness"
    Params = BrightnessParams

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        shift = _per_section(rng, sample, self.params.shift, self.params.per_section)
        out = sample.image + shift
        return sample.replace(image=_clipped(out))


class GammaParams(TransformParams):
    gamma: PositiveInterval = (0.7, 1.5)
    """Exponent; > 1 darkens the mid-tones."""


@registered
class Gamma(Transform):
    """Raise intensities to a power: ``x ** gamma`` on [0, 1]."""

    name = "gamma"
    Params = GammaParams

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        gamma = np.float32(_uniform(rng, self.params.gamma))
        return sample.replace(image=np.power(np.clip(sample.image, 0.0, 1.0), gamma))


class NoiseParams(TransformParams):
    sigma: NonNegativeInterval = (0.01, 0.05)
    """Standard deviation of the noise in [0, 1] intensity units."""


@registered
class GaussianNoise(Transform):
    """Add independent Gaussian noise to every voxel (and channel), clipped to [0, 1]."""

    name = "gaussian_noise"
    Params = NoiseParams

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        sigma = np.float32(_uniform(rng, self.params.sigma))
        out = rng.standard_normal(sample.image.shape, dtype=np.float32)
        out *= sigma
        out += sample.image
        return sample.replace(image=_clipped(out))


class BlurParams(TransformParams):
    sigma: NonNegativeInterval = (0.5, 1.5)
    """In-plane (y and x) standard deviation in voxels."""
    sigma_z: NonNegativeInterval = (0.0, 0.0)
    """Standard deviation along z in voxels (0: blur each section on its own)."""


@registered
class GaussianBlur(Transform):
    """Gaussian blur, in-plane and/or along z, with sigma in voxels."""

    name = "gaussian_blur"
    Params = BlurParams

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        sigma = _uniform(rng, self.params.sigma)
        sigma_z = _uniform(rng, self.params.sigma_z)
        lead = (0.0,) * (sample.image.ndim - 3)
        blurred = ndimage.gaussian_filter(
            sample.image, sigma=(*lead, sigma_z, sigma, sigma), mode="reflect", truncate=3.0
        )
        return sample.replace(image=blurred.astype(np.float32, copy=False))
