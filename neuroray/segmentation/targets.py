"""Training targets for EM instance segmentation: labels -> affinities, masks and class weights.

Affinity convention (the one waterz, gunpowder and lsd use): channel ``c`` holds the edges for
offset ``o_c = (dz, dy, dx)``, and ``affs[c, v]`` is the edge between voxel ``v`` and its
neighbour ``v - o_c`` (the neighbour in the *negative* direction for a positive offset)::

    affs[c, v] = 1  iff  labels[v] == labels[v - o_c]  (and both are objects, see below)

so with the default nearest-neighbour offsets ``((1, 0, 0), (0, 1, 0), (0, 0, 1))``, channel 0
links each voxel to the one below it in z, channel 1 in y and channel 2 in x, which is the layout
``waterz.agglomerate`` reads. Long-range offsets (for example ``(0, 0, 9)``) follow the same rule.
Edges whose neighbour lies outside the array have affinity 0 and mask 0.

Label 0 (``background=``):

- ``"boundary"`` (default, gunpowder's convention): 0 is not an object, e.g. the membrane voxels
  of fib_gala_train, where 0 separates every pair of objects. An edge touching 0 has affinity 0
  and is *known* (mask 1), so a network learns to cut there. With 0 masked out, such data would
  have no negative edge at all.
- ``"unknown"``: 0 means unlabelled. An edge touching 0 has affinity 0 and mask 0 (no loss).

Labels that touch without a gap (fib_medulla_s2) give 1-voxel-thin cuts that mark only one side
of each boundary; :func:`grow_boundary` thickens them for training, and the fragment step in
:mod:`neuroray.segmentation.agglomerate` reads both sides of every edge.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from neuroray.errors import NeurorayError

Offset = tuple[int, int, int]
NEAREST_OFFSETS: tuple[Offset, ...] = ((1, 0, 0), (0, 1, 0), (0, 0, 1))
"""z, y, x nearest-neighbour offsets: the three channels waterz reads."""

LONG_RANGE_OFFSETS: tuple[Offset, ...] = NEAREST_OFFSETS + (
    (2, 0, 0),
    (0, 3, 0),
    (0, 0, 3),
    (3, 0, 0),
    (0, 9, 0),
    (0, 0, 9),
)
"""Nearest plus long-range offsets (an isotropic lsd-style set); the first three stay nearest."""

Background = Literal["boundary", "unknown"]


class TargetError(NeurorayError):
    """Labels or offsets that cannot be turned into training targets."""


def check_offsets(offsets: Sequence[Sequence[int]]) -> tuple[Offset, ...]:
    """Offsets as a tuple of (dz, dy, dx) integer triples, or a TargetError saying what is wrong."""
    checked = []
    for offset in offsets:
        values = tuple(offset)
        if len(values) != 3 or not all(isinstance(v, int | np.integer) for v in values):
            raise TargetError(
                f"offset {offset!r} is not three integers (dz, dy, dx); use e.g. {NEAREST_OFFSETS}"
            )
        if values == (0, 0, 0):
            raise TargetError("offset (0, 0, 0) links a voxel to itself; remove it")
        checked.append(tuple(int(v) for v in values))
    if not checked:
        raise TargetError(f"no offsets given; use e.g. {NEAREST_OFFSETS}")
    return tuple(checked)


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise TargetError(f"labels must be 3D (z, y, x), got shape {labels.shape}")
    if labels.dtype.kind not in "iub":
        raise TargetError(
            f"labels must be integer instance ids, got dtype {labels.dtype}; "
            "cast a float label volume with .astype(np.uint64) first"
        )
    return labels


def edge_slices(
    shape: Sequence[int], offset: Offset
) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Slices ``(at, neighbour)`` such that ``x[at]`` and ``x[neighbour]`` pair every voxel ``v``
    with ``v - offset`` wherever both lie inside an array of ``shape``."""
    at, neighbour = [], []
    for size, step in zip(shape, offset, strict=True):
        if step >= 0:
            at.append(slice(min(step, size), size))
            neighbour.append(slice(0, max(size - step, 0)))
        else:
            at.append(slice(0, max(size + step, 0)))
            neighbour.append(slice(min(-step, size), size))
    return tuple(at), tuple(neighbour)


def seg_to_affinities(
    labels: np.ndarray,
    offsets: Sequence[Sequence[int]] = NEAREST_OFFSETS,
    *,
    background: Background = "boundary",
) -> tuple[np.ndarray, np.ndarray]:
    """Affinities and their mask from instance labels, both float32 ``[C, z, y, x]``.

    ``affs[c, v] = 1`` iff ``labels[v] == labels[v - offsets[c]] != 0``; ``mask`` is 0 where the
    neighbour is outside the array and, with ``background="unknown"``, on edges touching label 0.
    """
    labels = _check_labels(labels)
    offsets = check_offsets(offsets)
    if background not in ("boundary", "unknown"):
        raise TargetError(f"background must be 'boundary' or 'unknown', not {background!r}")
    affs = np.zeros((len(offsets), *labels.shape), dtype=np.float32)
    mask = np.zeros_like(affs)
    for channel, offset in enumerate(offsets):
        at, neighbour = edge_slices(labels.shape, offset)
        here, there = labels[at], labels[neighbour]
        both_objects = (here != 0) & (there != 0)
        affs[channel][at] = (here == there) & both_objects
        mask[channel][at] = both_objects if background == "unknown" else 1.0
    return affs, mask


def grow_boundary(labels: np.ndarray, steps: int = 1, *, only_xy: bool = False) -> np.ndarray:
    """Erode every object by ``steps`` voxels where it meets another label (gunpowder's
    GrowBoundary): touching objects get a gap of label 0, ``2 * steps`` voxels wide, that a
    network can learn as boundary on both sides. The array's faces are not boundaries."""
    labels = _check_labels(labels).copy()
    if steps < 0:
        raise TargetError(f"grow_boundary steps must be >= 0, got {steps}")
    axes = (1, 2) if only_xy else (0, 1, 2)
    for _ in range(steps):
        touches_other = np.zeros(labels.shape, dtype=bool)
        for axis in axes:
            offset = tuple(int(a == axis) for a in range(3))
            at, neighbour = edge_slices(labels.shape, offset)
            differs = labels[at] != labels[neighbour]
            touches_other[at] |= differs
            touches_other[neighbour] |= differs
        labels[touches_other] = 0
    return labels


def balance_weights(
    affs: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    clip: tuple[float, float] = (0.05, 0.95),
) -> np.ndarray:
    """Per-channel class-balancing loss weights, float32 like ``affs`` (gunpowder BalanceLabels).

    Within each channel, positive (affinity > 0.5) and negative edges under the mask get equal
    total weight, so rare cuts count as much as the many links. The positive fraction is clipped
    to ``clip`` so a channel with almost no cuts does not get enormous weights; masked-out edges
    get weight 0.
    """
    affs = np.asarray(affs, dtype=np.float32)
    mask = np.ones_like(affs) if mask is None else np.asarray(mask, dtype=np.float32)
    if affs.shape != mask.shape:
        raise TargetError(f"affs {affs.shape} and mask {mask.shape} must have the same shape")
    low, high = clip
    if not 0.0 < low <= high < 1.0:
        raise TargetError(f"clip must satisfy 0 < low <= high < 1, got {clip}")
    weights = np.zeros_like(affs)
    for channel in range(affs.shape[0]):
        known = mask[channel] > 0
        count = int(known.sum())
        if count == 0:
            continue
        positive = affs[channel] > 0.5
        fraction = float(np.clip((positive & known).sum() / count, low, high))
        weights[channel] = np.where(positive, 0.5 / fraction, 0.5 / (1.0 - fraction))
        weights[channel] *= mask[channel]
    return weights
