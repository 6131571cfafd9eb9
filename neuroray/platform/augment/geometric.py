"""Geometric transforms: index-only maps (flip, transpose, rot90, misalignment) and smooth warps
(elastic, rescale); image, labels and mask move together."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Annotated, Literal

import numpy as np
from pydantic import Field
from scipy import ndimage
from scipy.interpolate import CubicSpline

from neuroray.platform.augment.base import (
    SPATIAL,
    Axis,
    NonNegativeInterval,
    PositiveInterval,
    Sample,
    Transform,
    TransformParams,
    _uniform,
    registered,
)

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
