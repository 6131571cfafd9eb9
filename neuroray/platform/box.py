"""Axis-aligned boxes in voxel coordinates (z, y, x): crops, chunks, blocks."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np


def _triple(values: Sequence[int] | np.ndarray) -> tuple[int, int, int]:
    out = tuple(int(v) for v in values)
    if len(out) != 3:
        raise ValueError(f"expected 3 values (z, y, x), got {out}")
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class Box:
    """Half-open box ``[start, stop)`` along z, y, x."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", _triple(self.start))
        object.__setattr__(self, "stop", _triple(self.stop))

    @classmethod
    def from_shape(cls, shape: Sequence[int], start: Sequence[int] = (0, 0, 0)) -> Box:
        start = _triple(start)
        return cls(start, tuple(s + n for s, n in zip(start, _triple(shape), strict=True)))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.start, self.stop, strict=True))  # type: ignore[return-value]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def empty(self) -> bool:
        return any(n <= 0 for n in self.shape)

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop, strict=True))  # type: ignore[return-value]

    def intersect(self, other: Box) -> Box:
        start = tuple(max(a, b) for a, b in zip(self.start, other.start, strict=True))
        stop = tuple(min(a, b) for a, b in zip(self.stop, other.stop, strict=True))
        return Box(start, tuple(max(s, e) for s, e in zip(start, stop, strict=True)))

    def contains(self, other: Box) -> bool:
        return all(a <= b for a, b in zip(self.start, other.start, strict=True)) and all(
            a >= b for a, b in zip(self.stop, other.stop, strict=True)
        )

    def translate(self, offset: Sequence[int]) -> Box:
        offset = _triple(offset)
        return Box(
            tuple(a + o for a, o in zip(self.start, offset, strict=True)),
            tuple(b + o for b, o in zip(self.stop, offset, strict=True)),
        )

    def relative_to(self, origin: Box) -> tuple[slice, slice, slice]:
        """Slices of this box inside an array that covers ``origin``."""
        return self.translate(tuple(-o for o in origin.start)).slices

    def grow(self, margin: Sequence[int]) -> Box:
        margin = _triple(margin)
        return Box(
            tuple(a - m for a, m in zip(self.start, margin, strict=True)),
            tuple(b + m for b, m in zip(self.stop, margin, strict=True)),
        )

    def to_list(self) -> list[int]:
        return [*self.start, *self.stop]

    @classmethod
    def from_list(cls, values: Sequence[int]) -> Box:
        return cls(values[:3], values[3:6])

    def __str__(self) -> str:
        return "[" + ", ".join(f"{a}:{b}" for a, b in zip(self.start, self.stop, strict=True)) + "]"


def chunk_grid(bounds: Box, chunk_shape: Sequence[int]) -> Iterator[Box]:
    """Chunk-aligned boxes tiling ``bounds`` (edge chunks clipped), in z, y, x order."""
    chunk_shape = _triple(chunk_shape)
    ranges = [
        range(lo, hi, c) for lo, hi, c in zip(bounds.start, bounds.stop, chunk_shape, strict=True)
    ]
    for corner in itertools.product(*ranges):
        yield Box.from_shape(chunk_shape, corner).intersect(bounds)


def chunks_touching(box: Box, chunk_shape: Sequence[int], bounds: Box) -> Iterator[Box]:
    """The chunks of a grid anchored at ``bounds.start`` that overlap ``box``."""
    chunk_shape = _triple(chunk_shape)
    clipped = box.intersect(bounds)
    if clipped.empty:
        return
    first = [
        o + ((a - o) // c) * c
        for a, o, c in zip(clipped.start, bounds.start, chunk_shape, strict=True)
    ]
    ranges = [range(f, b, c) for f, b, c in zip(first, clipped.stop, chunk_shape, strict=True)]
    for corner in itertools.product(*ranges):
        yield Box.from_shape(chunk_shape, corner).intersect(bounds)
