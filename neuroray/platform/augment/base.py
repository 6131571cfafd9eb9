"""The augmentation contract: samples, the transform base class and its registry, shared helpers.

See :mod:`neuroray.platform.augment` for the contract every transform keeps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import AfterValidator, BeforeValidator, Field

from neuroray.config import StrictModel, validate
from neuroray.errors import NeurorayError
from neuroray.registry import Registry


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
