"""EM and LM augmentations for 3D crops, paired image / labels / mask, deterministic under a seed.

Contract (one for every transform):

- A :class:`Sample` holds ``image`` [z, y, x] or [C, z, y, x], optional integer ``labels``
  [z, y, x], optional ``mask`` [z, y, x] (bool or integer, e.g. "labels are valid here") and the
  voxel size in nm (z, y, x) when known.
- Images come in as **uint8** (scaled by 1/255) or **float normalised to [0, 1] by the caller**;
  every transform returns a **float32** image. Intensity transforms clip to [0, 1].
- Geometric transforms move image, labels and mask with the same map (image: linear
  interpolation, labels and mask: nearest, so label ids are never mixed). Intensity and artefact
  transforms change the image only; labels and mask stay the same objects.
- Where a geometric transform exposes voxels from outside the crop (misalignment, elastic,
  rescale), image, labels and mask are all **mirrored** at the crop border (half-sample symmetric,
  numpy ``"symmetric"`` / scipy ``"reflect"``). Image and labels therefore stay consistent
  everywhere and no voxel becomes "unknown".
- Inputs are never written to (crops may be read-only views of Ray's shared memory). A
  :class:`Compose` returns arrays that are C-contiguous, writable and share no memory with its
  input; a single transform that decides not to fire returns its input sample unchanged.
- Every random choice comes from the ``np.random.Generator`` passed in, so a seed fixes the output.

Pipelines are built from YAML-style specs (``[{name: flip, p: 0.5}, {name: gaussian_noise,
sigma: 0.05}]``) with :func:`build_pipeline`; :data:`DEFAULT_PIPELINES` names lists for EM, LM and
the MS-Con shared / weak / strong views (:class:`MSConAugmentConfig`).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import AfterValidator, BeforeValidator, Field
from scipy import ndimage
from scipy.interpolate import CubicSpline

from neuroray.config import StrictModel, validate
from neuroray.errors import ConfigError, NeurorayError, RegistryError
from neuroray.registry import Registry, closest


class AugmentError(NeurorayError):
    """A sample handed to an augmentation has the wrong shape or dtype."""


# --------------------------------------------------------------------------------------------
# Samples


@dataclasses.dataclass(frozen=True)
class Sample:
    """One crop: image [z,y,x] or [C,z,y,x], optional labels and mask [z,y,x], voxel size (nm)."""

    image: np.ndarray
    labels: np.ndarray | None = None
    mask: np.ndarray | None = None
    voxel_size: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        image = np.asarray(self.image)
        if image.ndim not in (3, 4):
            raise AugmentError(f"image has shape {image.shape}; expected [z, y, x] or [C, z, y, x]")
        object.__setattr__(self, "image", image)
        for field in ("labels", "mask"):
            value = getattr(self, field)
            if value is None:
                continue
            value = np.asarray(value)
            if value.shape != image.shape[-3:]:
                raise AugmentError(
                    f"{field} has shape {value.shape} but the image's z, y, x shape is "
                    f"{image.shape[-3:]}; crop both from the same box"
                )
            if value.dtype.kind not in "biu":
                raise AugmentError(
                    f"{field} must be an integer or bool array (got {value.dtype}); "
                    "labels are instance ids, not intensities"
                )
            object.__setattr__(self, field, value)
        if self.voxel_size is not None:
            size = tuple(float(v) for v in self.voxel_size)
            if len(size) != 3 or min(size) <= 0:
                raise AugmentError(
                    f"voxel_size {self.voxel_size} must be three positive numbers (nm, z, y, x)"
                )
            object.__setattr__(self, "voxel_size", size)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The spatial shape (z, y, x)."""
        return self.image.shape[-3:]  # type: ignore[return-value]

    def replace(self, **changes: Any) -> Sample:
        return dataclasses.replace(self, **changes)

    def map_spatial(self, move: Callable[[np.ndarray], np.ndarray]) -> Sample:
        """Apply one index-only map (flip, transpose, ...) to image, labels and mask alike."""

        def moved(array: np.ndarray | None) -> np.ndarray | None:
            return None if array is None else np.ascontiguousarray(move(array))

        return self.replace(
            image=moved(self.image), labels=moved(self.labels), mask=moved(self.mask)
        )


def as_float_image(image: np.ndarray) -> np.ndarray:
    """The image as float32 in [0, 1]: unsigned ints are scaled by 1/max (uint8: 1/255); float
    is taken as normalised."""
    if image.dtype == np.float32:
        return image
    if image.dtype.kind == "u":
        return image.astype(np.float32) * np.float32(1 / np.iinfo(image.dtype).max)
    if image.dtype.kind == "f":
        return image.astype(np.float32)
    raise AugmentError(
        f"image dtype {image.dtype} is not supported: pass unsigned ints (scaled by 1/max) or a float "
        "image the caller has normalised to [0, 1]"
    )


# --------------------------------------------------------------------------------------------
# Parameter types


def _pair(value: Any) -> Any:
    """A single number means a fixed value: ``0.05`` is the interval ``(0.05, 0.05)``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (value, value)
    return value


def _ordered(value: tuple[Any, Any]) -> tuple[Any, Any]:
    if value[0] > value[1]:
        raise ValueError(f"interval {list(value)} must be [low, high] with low <= high")
    return value


Interval = Annotated[tuple[float, float], BeforeValidator(_pair), AfterValidator(_ordered)]
"""A number (fixed) or ``[low, high]`` (drawn uniformly per sample)."""


def _positive(value: tuple[float, float]) -> tuple[float, float]:
    if value[0] <= 0:
        raise ValueError(f"{list(value)} must be positive")
    return value


def _non_negative(value: tuple[float, float]) -> tuple[float, float]:
    if value[0] < 0:
        raise ValueError(f"{list(value)} must not be negative")
    return value


def _fraction(value: tuple[float, float]) -> tuple[float, float]:
    if value[0] < 0 or value[1] > 1:
        raise ValueError(f"{list(value)} must lie within [0, 1] (a fraction of the crop)")
    return value


PositiveInterval = Annotated[Interval, AfterValidator(_positive)]
NonNegativeInterval = Annotated[Interval, AfterValidator(_non_negative)]
FractionInterval = Annotated[Interval, AfterValidator(_fraction)]
Count = Annotated[
    tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]],
    BeforeValidator(_pair),
    AfterValidator(_ordered),
]
"""A count (fixed) or ``[low, high]`` (drawn uniformly, both ends included)."""
Fill = float | Literal["mean"]
Axis = Literal["z", "y", "x"]
SPATIAL = {"z": -3, "y": -2, "x": -1}


def _uniform(rng: np.random.Generator, interval: tuple[float, float]) -> float:
    return float(rng.uniform(interval[0], interval[1]))


def _count(rng: np.random.Generator, interval: tuple[int, int], most: int | None = None) -> int:
    drawn = int(rng.integers(interval[0], interval[1] + 1))
    return drawn if most is None else min(drawn, most)


def _fill_value(image: np.ndarray, fill: Fill) -> float:
    return float(image.mean()) if fill == "mean" else float(fill)


# --------------------------------------------------------------------------------------------
# Transforms


class TransformParams(StrictModel):
    """Every transform fires with probability ``p``."""

    p: float = Field(0.5, ge=0.0, le=1.0)


AUGMENTATIONS: Registry[type[Transform]] = Registry("augmentation")


def registered(cls: type[Transform]) -> type[Transform]:
    """Register a transform class under its ``name``."""
    return AUGMENTATIONS.register(cls.name)(cls)


class Transform:
    """A configurable, seeded transform of a :class:`Sample`.

    Subclasses set ``name``, ``Params`` (a :class:`TransformParams`), ``geometric`` (moves
    labels with the image) and implement :meth:`apply`.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[TransformParams]] = TransformParams
    geometric: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        self.params = validate(self.Params, params, source=f"augmentation {self.name!r}")

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        image = as_float_image(sample.image)
        if image is not sample.image:
            sample = sample.replace(image=image)
        if rng.random() >= self.params.p:
            return sample
        return self.apply(sample, rng)

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """The YAML-style spec that rebuilds this transform."""
        return {"name": self.name, **self.params.model_dump(mode="json")}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump().items())
        return f"{type(self).__name__}({args})"


# --- geometric: index-only maps ---------------------------------------------------------------


class FlipParams(TransformParams):
    axes: list[Axis] = ["z", "y", "x"]


@registered
class Flip(Transform):
    """Flip each listed axis independently with probability 1/2."""

    name = "flip"
    Params = FlipParams
    geometric = True

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        axes = tuple(SPATIAL[a] for a in self.params.axes if rng.random() < 0.5)
        if not axes:
            return sample
        return sample.map_spatial(lambda a: np.flip(a, axis=axes))


class TransposeParams(TransformParams):
    isotropy_tolerance: float = Field(0.05, ge=0.0)
    """Axes whose voxel sizes differ by at most this fraction may be swapped."""


@registered
class Transpose(Transform):
    """Permute spatial axes, only among axes with equal voxel size and equal extent.

    With an anisotropic (or unknown) z voxel size only y <-> x is possible; z takes part only
    when the voxel size is isotropic. The shape never changes.
    """

    name = "transpose"
    Params = TransposeParams
    geometric = True

    def permutations(self, sample: Sample) -> list[tuple[int, int, int]]:
        """The non-identity permutations of (z, y, x) allowed for this sample."""
        size = sample.voxel_size
        tolerance = self.params.isotropy_tolerance

        def same(a: int, b: int) -> bool:
            if a == b:
                return True
            if sample.shape[a] != sample.shape[b]:
                return False
            if size is None:  # unknown voxel size: assume anisotropic z, isotropic y-x
                return a != 0 and b != 0
            return abs(size[a] - size[b]) <= tolerance * max(size[a], size[b])

        return [
            perm
            for perm in itertools.permutations(range(3))
            if perm != (0, 1, 2) and all(same(i, p) for i, p in enumerate(perm))
        ]

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        choices = self.permutations(sample)
        if not choices:
            return sample
        perm = choices[int(rng.integers(len(choices)))]

        def move(a: np.ndarray) -> np.ndarray:
            lead = a.ndim - 3
            return a.transpose(*range(lead), *(lead + q for q in perm))

        return sample.map_spatial(move)


@registered
class Rot90(Transform):
    """Rotate by a multiple of 90 degrees in y-x (only 180 when y and x extents differ)."""

    name = "rot90"
    geometric = True

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        square = sample.shape[1] == sample.shape[2]
        k = int(rng.integers(1, 4)) if square else 2
        return sample.map_spatial(lambda a: np.rot90(a, k, axes=(-2, -1)))


class MisalignmentParams(TransformParams):
    max_shift: int = Field(8, ge=1)
    """Largest shift in y and in x, in voxels."""
    mode: Literal["translation", "slip"] = "translation"
    """translation: every section from a random z on moves; slip: one section moves."""


@registered
class Misalignment(Transform):
    """Shift a slab of z-sections in y-x, image and labels alike (a section alignment error).

    The slab is mirrored at the crop border to fill the exposed strip, so labels stay aligned
    with the image there too; in-plane neighbourhoods inside the slab are unchanged.
    """

    name = "misalignment"
    Params = MisalignmentParams
    geometric = True

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        depth = sample.shape[0]
        if self.params.mode == "translation":
            if depth < 2:
                return sample
            start, stop = int(rng.integers(1, depth)), depth
        else:
            start = int(rng.integers(depth))
            stop = start + 1
        m = self.params.max_shift
        dy, dx = 0, 0
        while dy == 0 and dx == 0:
            dy, dx = (int(v) for v in rng.integers(-m, m + 1, size=2))

        def move(a: np.ndarray) -> np.ndarray:
            out = a.copy()
            slab = a[..., start:stop, :, :]
            pad = [(0, 0)] * (a.ndim - 2) + [(abs(dy), abs(dy)), (abs(dx), abs(dx))]
            padded = np.pad(slab, pad, mode="symmetric")
            y0, x0 = abs(dy) - dy, abs(dx) - dx
            out[..., start:stop, :, :] = padded[..., y0 : y0 + a.shape[-2], x0 : x0 + a.shape[-1]]
            return out

        return sample.map_spatial(move)


# --- geometric: smooth warps --------------------------------------------------------------------


def reflect_index(coordinate: np.ndarray, n: int) -> np.ndarray:
    """Nearest voxel index of float coordinates, mirrored into [0, n) (numpy "symmetric").

    Half-sample symmetric, like scipy's ``mode="reflect"`` used for the image, so labels and
    image agree beyond the crop border.
    """
    index = np.rint(coordinate).astype(np.int32)
    if index.size and (index.min() < -n or index.max() >= 2 * n):
        index = np.mod(index, 2 * n)
    np.subtract(-1, index, out=index, where=index < 0)
    np.subtract(2 * n - 1, index, out=index, where=index >= n)
    return index


def warp(sample: Sample, dz: np.ndarray | None, dy: np.ndarray, dx: np.ndarray) -> Sample:
    """Resample image (linear) and labels/mask (nearest) at ``voxel + displacement``.

    Displacements are float32 arrays of the spatial shape, in voxels; ``dz`` None keeps every
    section in its plane (EM) and runs section by section, which is about twice as fast.
    Outside the crop everything is mirrored (scipy "reflect" == numpy "symmetric").
    """
    depth, height, width = sample.shape
    z, y, x = np.meshgrid(
        np.arange(depth, dtype=np.float32),
        np.arange(height, dtype=np.float32),
        np.arange(width, dtype=np.float32),
        indexing="ij",
        sparse=True,
    )
    src_y, src_x = y + dy, x + dx
    src_z = None if dz is None else z + dz

    def linear(volume: np.ndarray) -> np.ndarray:
        if src_z is not None:
            coords = np.stack([src_z, src_y, src_x])
            return ndimage.map_coordinates(
                volume, coords, order=1, mode="reflect", output=np.float32
            )
        out = np.empty(volume.shape, dtype=np.float32)
        for k in range(depth):
            ndimage.map_coordinates(
                volume[k], plane_coords[k], order=1, mode="reflect", output=out[k]
            )
        return out

    if src_z is None:  # built once (float64, as scipy wants) and reused for every channel
        plane_coords = np.empty((depth, 2, height, width), dtype=np.float64)
        plane_coords[:, 0] = src_y
        plane_coords[:, 1] = src_x

    image = sample.image
    new_image = linear(image) if image.ndim == 3 else np.stack([linear(c) for c in image])

    labels, mask = sample.labels, sample.mask
    if labels is not None or mask is not None:
        flat = reflect_index(src_y, height) * width
        flat += reflect_index(src_x, width)
        if src_z is None:
            flat += (np.arange(depth, dtype=np.int32) * (height * width))[:, None, None]
        else:
            flat += reflect_index(src_z, depth) * (height * width)
        labels = None if labels is None else labels.reshape(-1).take(flat)
        mask = None if mask is None else mask.reshape(-1).take(flat)
    return sample.replace(image=new_image, labels=labels, mask=mask)


def resample_axis(array: np.ndarray, source: np.ndarray, axis: int, linear: bool) -> np.ndarray:
    """Resample one axis at float positions ``source`` (mirrored border): a separable warp."""
    n = array.shape[axis]
    if not linear:
        return np.take(array, reflect_index(source, n), axis=axis)
    low = np.floor(source)
    weight = (source - low).astype(np.float32).reshape((-1,) + (1,) * (-axis - 1))
    below = np.take(array, reflect_index(low, n), axis=axis)
    above = np.take(array, reflect_index(low + 1, n), axis=axis)
    return below + (above - below) * weight


def _spline_matrix(n_points: int, n_out: int) -> np.ndarray:
    """Cubic-spline weights (n_out x n_points) from control points spread over [0, n_out - 1]."""
    knots = np.linspace(0.0, n_out - 1, n_points)
    return CubicSpline(knots, np.eye(n_points), bc_type="natural")(np.arange(n_out))


def smooth_field(
    rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[int], std: float
) -> np.ndarray:
    """A smooth random displacement field: normal values on a coarse grid, spline-upsampled."""
    grid = [max(2, math.ceil((n - 1) / s) + 1) for n, s in zip(shape, spacing, strict=True)]
    coarse = rng.normal(0.0, std, size=grid)
    mz, my, mx = (_spline_matrix(g, n) for g, n in zip(grid, shape, strict=True))
    field = np.tensordot(mz, coarse, axes=(1, 0))  # (Z, gy, gx)
    field = field @ mx.T  # (Z, gy, X)
    field = np.matmul(my, field)  # (Z, Y, X)
    return field.astype(np.float32)


class ElasticParams(TransformParams):
    magnitude: NonNegativeInterval = (1.0, 4.0)
    """Standard deviation of the in-plane displacement at the control points, in voxels."""
    magnitude_z: NonNegativeInterval = (0.0, 0.0)
    """Standard deviation of the z displacement (0: sections stay sections, right for EM)."""
    grid_spacing: tuple[
        Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]
    ] = (8, 32, 32)
    """Control-point spacing (z, y, x) in voxels: larger is smoother."""


@registered
class Elastic(Transform):
    """Smooth random deformation; image interpolated linearly, labels and mask by nearest."""

    name = "elastic"
    Params = ElasticParams
    geometric = True

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        spacing = self.params.grid_spacing
        std = _uniform(rng, self.params.magnitude)
        dy = smooth_field(rng, sample.shape, spacing, std)
        dx = smooth_field(rng, sample.shape, spacing, std)
        std_z = _uniform(rng, self.params.magnitude_z)
        dz = smooth_field(rng, sample.shape, spacing, std_z) if std_z > 0 else None
        return warp(sample, dz, dy, dx)


class RescaleParams(TransformParams):
    factor: PositiveInterval = (0.8, 1.25)
    """In-plane zoom factor (> 1 magnifies); z is left alone."""


@registered
class Rescale(Transform):
    """Zoom in y-x about the crop centre, keeping the shape (mirrored border when zooming out)."""

    name = "rescale"
    Params = RescaleParams
    geometric = True

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        factor = _uniform(rng, self.params.factor)
        if factor == 1.0:
            return sample
        _, height, width = sample.shape
        src_y = (np.arange(height) - (height - 1) / 2) / factor + (height - 1) / 2
        src_x = (np.arange(width) - (width - 1) / 2) / factor + (width - 1) / 2

        def zoom(array: np.ndarray, linear: bool) -> np.ndarray:
            rows = resample_axis(array, src_y, axis=-2, linear=linear)
            return resample_axis(rows, src_x, axis=-1, linear=linear)

        return sample.replace(
            image=zoom(sample.image, linear=True),
            labels=None if sample.labels is None else zoom(sample.labels, linear=False),
            mask=None if sample.mask is None else zoom(sample.mask, linear=False),
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


# --------------------------------------------------------------------------------------------
# Pipelines


class Compose:
    """Transforms applied in order with one generator; output arrays are always fresh."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, rng: np.random.Generator | int) -> Sample:
        if not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(rng)
        out = sample.replace(image=as_float_image(sample.image))
        for transform in self.transforms:
            out = transform(out, rng)
        return out.replace(
            image=_owned(out.image, sample.image),
            labels=_owned(out.labels, sample.labels),
            mask=_owned(out.mask, sample.mask),
        )

    def specs(self) -> list[dict[str, Any]]:
        """The spec list that rebuilds this pipeline (JSON / YAML serialisable)."""
        return [transform.spec() for transform in self.transforms]

    def __len__(self) -> int:
        return len(self.transforms)

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


def _owned(array: np.ndarray | None, original: np.ndarray | None) -> np.ndarray | None:
    """A C-contiguous, writable array that shares no memory with the caller's input."""
    if array is None:
        return None
    if original is not None and np.may_share_memory(array, original):
        return np.array(array, order="C")
    if not array.flags.c_contiguous or not array.flags.writeable:
        return np.array(array, order="C")
    return array


def build_transform(spec: Mapping[str, Any], where: str = "augmentation") -> Transform:
    """One transform from ``{name: ..., **params}``; bad names and params raise helpful errors."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a mapping like {{name: flip, p: 0.5}}, got {spec!r}")
    params = dict(spec)
    name = params.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(
            f"{where}: every augmentation needs a 'name' (one of {', '.join(AUGMENTATIONS)}); "
            f"got {spec!r}"
        )
    try:
        cls = AUGMENTATIONS.get(name)
    except RegistryError as err:
        raise RegistryError(f"{where}: {err}") from None
    try:
        return cls(**params)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def build_pipeline(specs: Sequence[Mapping[str, Any]] | str) -> Compose:
    """A :class:`Compose` from YAML-style specs, or from the name of a default list."""
    if isinstance(specs, str):
        specs = default_pipeline(specs)
    if not isinstance(specs, Sequence):
        raise ConfigError(
            f"augmentations must be a list of {{name: ..., params...}} mappings, got {specs!r}"
        )
    return Compose(
        [
            build_transform(spec, where=f"augmentation #{i} ({_name_of(spec)})")
            for i, spec in enumerate(specs)
        ]
    )


def _name_of(spec: Any) -> str:
    return str(spec.get("name", "?")) if isinstance(spec, Mapping) else "?"


DEFAULT_PIPELINES: dict[str, list[dict[str, Any]]] = {
    # Supervised EM (anisotropic ssTEM or isotropic FIB-SEM): dihedral symmetries, section-wise
    # intensity changes, and the classic serial-section defects.
    "em": [
        {"name": "flip", "p": 1.0},
        {"name": "transpose", "p": 0.5},
        {"name": "contrast", "p": 0.5, "factor": [0.8, 1.2], "per_section": True},
        {"name": "brightness", "p": 0.5, "shift": [-0.08, 0.08], "per_section": True},
        {"name": "gamma", "p": 0.3, "gamma": [0.8, 1.25]},
        {"name": "gaussian_noise", "p": 0.3, "sigma": [0.01, 0.04]},
        {"name": "gaussian_blur", "p": 0.2, "sigma": [0.5, 1.2]},
        {"name": "missing_sections", "p": 0.1, "count": [1, 1]},
        {"name": "partially_missing_sections", "p": 0.1, "count": [1, 1]},
        {"name": "low_contrast_sections", "p": 0.1, "count": [1, 1]},
        {"name": "misalignment", "p": 0.2, "max_shift": 6},
        {"name": "elastic", "p": 0.3, "magnitude": [1.0, 3.0]},
    ],
    # Confocal LM of single neurons: no section artefacts; blur along z too, mild deformation.
    "lm": [
        {"name": "flip", "p": 1.0},
        {"name": "transpose", "p": 0.5},
        {"name": "rescale", "p": 0.2, "factor": [0.9, 1.1]},
        {"name": "contrast", "p": 0.5},
        {"name": "brightness", "p": 0.5, "shift": [-0.05, 0.05]},
        {"name": "gamma", "p": 0.5},
        {"name": "gaussian_noise", "p": 0.3, "sigma": [0.01, 0.03]},
        {"name": "gaussian_blur", "p": 0.2, "sigma": [0.5, 1.0], "sigma_z": [0.0, 0.5]},
        {"name": "elastic", "p": 0.2, "magnitude": [1.0, 2.0]},
    ],
    # MS-Con: applied once to the crop, so the clean target and both views share orientation.
    "mscon_shared": [
        {"name": "flip", "p": 1.0},
        {"name": "transpose", "p": 0.5},
    ],
    # MS-Con weak view: photometric only, small.
    "mscon_weak": [
        {"name": "contrast", "p": 0.5, "factor": [0.9, 1.1]},
        {"name": "brightness", "p": 0.5, "shift": [-0.05, 0.05]},
        {"name": "gaussian_noise", "p": 0.5, "sigma": [0.0, 0.02]},
    ],
    # MS-Con strong view: everything the network must learn to see through.
    "mscon_strong": [
        {"name": "contrast", "p": 0.8, "factor": [0.6, 1.4], "per_section": True},
        {"name": "brightness", "p": 0.8, "shift": [-0.15, 0.15], "per_section": True},
        {"name": "gamma", "p": 0.5, "gamma": [0.6, 1.6]},
        {"name": "gaussian_noise", "p": 0.8, "sigma": [0.02, 0.08]},
        {"name": "gaussian_blur", "p": 0.5, "sigma": [0.5, 2.0]},
        {"name": "motion_blur", "p": 0.3},
        {"name": "cutout", "p": 0.5},
        {"name": "missing_sections", "p": 0.5},
        {"name": "partially_missing_sections", "p": 0.3},
        {"name": "low_contrast_sections", "p": 0.3},
        {"name": "misalignment", "p": 0.5},
        {"name": "elastic", "p": 0.5},
    ],
}


def default_pipeline(name: str) -> list[dict[str, Any]]:
    """A copy of one of :data:`DEFAULT_PIPELINES` (em, lm, mscon_shared, mscon_weak, ...)."""
    if name not in DEFAULT_PIPELINES:
        hint = closest(name, list(DEFAULT_PIPELINES))
        did_you_mean = f"; did you mean {hint!r}?" if hint else ""
        raise ConfigError(
            f"unknown augmentation list {name!r}{did_you_mean} "
            f"(known: {', '.join(DEFAULT_PIPELINES)})"
        )
    return copy.deepcopy(DEFAULT_PIPELINES[name])


def _checked_specs(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validate at config-load time and return the specs with every parameter spelled out."""
    try:
        return build_pipeline(specs).specs()
    except NeurorayError as err:
        raise ValueError(str(err)) from None


PipelineSpec = Annotated[list[dict[str, Any]], AfterValidator(_checked_specs)]
"""A config field holding an augmentation list; bad names or params fail when the config loads."""


class MSConAugmentConfig(StrictModel):
    """The explicit augmentation lists of MS-Con (the published code drew both from one list).

    ``shared`` is applied once to the crop (it becomes the clean reconstruction target); the
    ``weak`` and ``strong`` views are then drawn from it independently.
    """

    shared: PipelineSpec = Field(
        default_factory=lambda: default_pipeline("mscon_shared"), validate_default=True
    )
    weak: PipelineSpec = Field(
        default_factory=lambda: default_pipeline("mscon_weak"), validate_default=True
    )
    strong: PipelineSpec = Field(
        default_factory=lambda: default_pipeline("mscon_strong"), validate_default=True
    )

    def pipelines(self) -> tuple[Compose, Compose, Compose]:
        return build_pipeline(self.shared), build_pipeline(self.weak), build_pipeline(self.strong)

    def views(self, sample: Sample, rng: np.random.Generator) -> tuple[Sample, Sample, Sample]:
        """(clean target, weak view, strong view) of one crop."""
        shared, weak, strong = self.pipelines()
        clean = shared(sample, rng)
        return clean, weak(clean, rng), strong(clean, rng)
