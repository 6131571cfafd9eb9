"""Instance segmentation from affinities: fragments, then agglomeration over a threshold sweep.

Affinities follow :mod:`neuroray.segmentation.targets`: ``affs[c, v]`` is the edge between ``v``
and ``v - offsets[c]``. The steps:

1. :func:`boundary_map`: for each voxel the lowest affinity over *both* directions of each axis,
   ``min(affs[c, v], affs[c, v + o_c])``. A nearest-neighbour edge is stored at one voxel only,
   so where labels touch without a gap (fib_medulla_s2), a map built from ``affs[:, v]`` alone
   (e.g. their mean) marks one side of each boundary and every object leaks into its neighbour.
2. :func:`fragments_from_affinities`: distance-transform watershed (lsd style) seeded at local
   maxima of the distance to that boundary (and in every inside region without one), in 3D or
   per z slice. That alone still merges touching objects: a thin process has no inside voxel
   and is flooded from its neighbour. So every fragment is then split along the cut edges it
   straddles (:func:`split_at_cut_edges`: connected components of the affinity graph inside
   each fragment, ``cc3d.color_connectivity_graph``) and no fragment crosses a predicted cut.
3. :func:`agglomerate`: a method from :data:`AGGLOMERATORS` (``waterz``; ``mwatershed`` when
   installed) merges them, giving one segmentation per threshold.

On real ground truth (targets -> fragments -> waterz at 0.5) this reproduces fib_gala_train and
fib_medulla_s2 up to relabelling; the only merges left are single-voxel objects, which no
affinity can represent.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import cc3d
import fastremap
import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

from neuroray.errors import NeurorayError
from neuroray.registry import Registry
from neuroray.segmentation.targets import NEAREST_OFFSETS, check_offsets, edge_slices

DEFAULT_SCORING = "OneMinus<HistogramQuantileAffinity<RegionGraphType, 50, ScoreValue, 256>>"
"""waterz edge score: one minus the median affinity between two regions (precompiled in waterz)."""

DEFAULT_THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

Agglomerator = Callable[..., Iterator[tuple[float, np.ndarray]]]
AGGLOMERATORS: Registry[Agglomerator] = Registry("agglomeration method")


class AgglomerationError(NeurorayError):
    """Affinities, fragments or options that cannot be agglomerated, or a missing backend."""


def _check_affs(affs: np.ndarray, offsets: Sequence[Sequence[int]]) -> np.ndarray:
    affs = np.asarray(affs)
    if affs.ndim != 4:
        raise AgglomerationError(f"affinities must be 4D (C, z, y, x), got shape {affs.shape}")
    if affs.shape[0] != len(offsets):
        raise AgglomerationError(
            f"affinities have {affs.shape[0]} channels but {len(offsets)} offsets were given; "
            "pass the offsets the affinities were made with"
        )
    if affs.dtype.kind != "f":
        raise AgglomerationError(
            f"affinities must be floats in [0, 1], got dtype {affs.dtype}; "
            "convert uint8 predictions with affs.astype(np.float32) / 255"
        )
    return affs


def nearest_channels(offsets: Sequence[Sequence[int]]) -> tuple[int, int, int]:
    """Indices of the z, y and x nearest-neighbour channels, which waterz reads, in that order."""
    offsets = check_offsets(offsets)
    try:
        return tuple(offsets.index(o) for o in NEAREST_OFFSETS)  # type: ignore[return-value]
    except ValueError:
        raise AgglomerationError(
            f"offsets {offsets} lack one of the nearest-neighbour offsets {NEAREST_OFFSETS}, "
            "which fragments and waterz need"
        ) from None


def boundary_map(
    affs: np.ndarray, offsets: Sequence[Sequence[int]] = NEAREST_OFFSETS
) -> np.ndarray:
    """Lowest nearest-neighbour affinity of each voxel to any of its 6 neighbours, float32.

    Both voxels of a cut edge get a low value, so both sides of every boundary are marked, also
    where labels touch. Edges to outside the array (``affs[c, v]`` on the first slice along the
    offset's axis) carry no information and are skipped.
    """
    affs = _check_affs(affs, offsets)
    lowest = np.ones(affs.shape[1:], dtype=np.float32)
    for axis, channel in enumerate(nearest_channels(offsets)):
        at, neighbour = edge_slices(lowest.shape, NEAREST_OFFSETS[axis])
        edge = affs[channel][at]
        np.minimum(lowest[at], edge, out=lowest[at])
        np.minimum(lowest[neighbour], edge, out=lowest[neighbour])
    return lowest


def split_at_cut_edges(
    fragments: np.ndarray,
    affs: np.ndarray,
    offsets: Sequence[Sequence[int]] = NEAREST_OFFSETS,
    *,
    threshold: float = 0.5,
) -> np.ndarray:
    """Split each fragment into the parts joined by edges with affinity above ``threshold``.

    Voxels cut off by the split keep their links to the object they belong to (a watershed
    floods a thin process, which has no inside, from its neighbour), so agglomeration puts them
    back. A voxel with no such edge at all (membrane, or label 0 in the targets) carries no
    evidence of where it belongs: it gets fragment 0, which waterz leaves out of the region
    graph (its edges would otherwise drag the scores of the edges it lies on towards 0) and
    :func:`agglomerate` assigns to the nearest segment afterwards. Returns uint64, 0..N.
    """
    affs = _check_affs(affs, offsets)
    fragments = np.asarray(fragments)
    graph = np.zeros(fragments.shape, dtype=np.uint8)
    has_link = np.zeros(fragments.shape, dtype=bool)
    # cc3d's voxel connectivity graph: bit 2a is +axis a, bit 2a+1 is -axis a (array axis order)
    for axis, channel in enumerate(nearest_channels(offsets)):
        at, neighbour = edge_slices(fragments.shape, NEAREST_OFFSETS[axis])
        strong = affs[channel][at] > threshold
        has_link[at] |= strong
        has_link[neighbour] |= strong
        linked = (strong & (fragments[at] == fragments[neighbour])).astype(np.uint8)
        graph[neighbour] |= linked << (2 * axis)
        graph[at] |= linked << (2 * axis + 1)
    parts = cc3d.color_connectivity_graph(graph, connectivity=6)
    parts[~has_link] = 0
    return fastremap.renumber(parts, preserve_zero=True)[0].astype(np.uint64)


def nearest_fragment(fragments: np.ndarray) -> np.ndarray:
    """Fragments with every 0 voxel given the id of the nearest non-zero fragment (6-connected
    breadth-first flood); unchanged when there is no 0 or nothing else."""
    if fragments.all() or not fragments.any():
        return fragments
    # a flat image makes skimage's watershed a breadth-first search from the markers
    return watershed(np.zeros(fragments.shape, np.uint8), fragments).astype(fragments.dtype)


def _boundary_distance(
    inside: np.ndarray, per_slice: bool, voxel_size: Sequence[float] | None
) -> np.ndarray:
    if per_slice:
        sampling = None if voxel_size is None else tuple(voxel_size)[1:]
        planes = [ndimage.distance_transform_edt(plane, sampling=sampling) for plane in inside]
        return np.stack(planes).astype(np.float32)
    return ndimage.distance_transform_edt(inside, sampling=voxel_size).astype(np.float32)


def _seeds(
    distance: np.ndarray, inside: np.ndarray, seed_distance: int, structure: np.ndarray
) -> np.ndarray:
    """Local maxima of the boundary distance, plus the whole of any inside region lacking one
    (a small object next to a bigger one has no maximum of its own and would be flooded)."""
    size = [2 * seed_distance + 1] * 3
    if not structure[0].any():  # per slice
        size[0] = 1
    seeded = (ndimage.maximum_filter(distance, size=size) == distance) & inside
    regions, count = ndimage.label(inside, structure=structure)
    has_seed = np.zeros(count + 1, dtype=bool)
    has_seed[regions[seeded]] = True
    seeded |= inside & ~has_seed[regions]
    return ndimage.label(seeded, structure=structure)[0]


def fragments_from_affinities(
    affs: np.ndarray,
    offsets: Sequence[Sequence[int]] = NEAREST_OFFSETS,
    *,
    threshold: float = 0.5,
    seed_distance: int = 10,
    per_slice: bool = False,
    voxel_size: Sequence[float] | None = None,
    respect_edges: bool = True,
) -> np.ndarray:
    """Over-segmentation (uint64) for agglomeration; 0 marks voxels without evidence.

    Voxels whose :func:`boundary_map` exceeds ``threshold`` are inside objects; seeds are the
    local maxima of their distance to the boundary within ``seed_distance`` voxels (in-plane
    when ``per_slice``, for anisotropic stacks), and a watershed on that distance fills every
    voxel, boundary voxels included (seg label 0 would otherwise score as one huge object).
    ``voxel_size`` (nm, z, y, x) scales the distance. With ``respect_edges`` fragments are then
    split along the cut edges they straddle and voxels with no link at all get 0
    (:func:`split_at_cut_edges`); without, every voxel has a fragment 1..N.
    """
    affs = _check_affs(affs, offsets)
    inside = boundary_map(affs, offsets) > threshold
    structure = ndimage.generate_binary_structure(3, 1)
    if per_slice:
        structure[0] = structure[2] = False
    distance = _boundary_distance(inside, per_slice, voxel_size)
    seeds = _seeds(distance, inside, seed_distance, structure)
    fragments = watershed(distance.max() - distance, seeds, connectivity=structure)
    if respect_edges:
        return split_at_cut_edges(fragments, affs, offsets, threshold=threshold)
    return fastremap.renumber(fragments, preserve_zero=True)[0].astype(np.uint64)


@contextlib.contextmanager
def _c_stdout_silenced(quiet: bool) -> Iterator[None]:
    """Send C++ ``std::cout`` (waterz logs every threshold) to /dev/null while inside."""
    if not quiet:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


@AGGLOMERATORS.register("waterz")
def waterz_agglomerate(
    affs: np.ndarray,
    offsets: Sequence[Sequence[int]],
    thresholds: Sequence[float],
    *,
    fragments: np.ndarray | None = None,
    fill_unassigned: bool = True,
    scoring_function: str = DEFAULT_SCORING,
    discretize_queue: int = 0,
    quiet: bool = True,
) -> Iterator[tuple[float, np.ndarray]]:
    """waterz region merging of ``fragments`` on the nearest-neighbour affinities.

    ``fragments`` default to :func:`fragments_from_affinities` with its defaults. waterz never
    merges fragment 0; with ``fill_unassigned`` its voxels then take the segment of the nearest
    fragment (pass ``False`` when 0 is a mask to keep). ``scoring_function`` is a waterz C++
    type string: the mean and the 10..95 % quantiles are precompiled, anything else is compiled
    at first use (needs witty, a compiler and boost). ``quiet`` hides waterz's C++ log.
    """
    import waterz

    if fragments is None:
        fragments = fragments_from_affinities(affs, offsets)
    elif np.shape(fragments) != affs.shape[1:]:
        raise AgglomerationError(
            f"fragments {np.shape(fragments)} must match the affinities' volume {affs.shape[1:]}"
        )
    # compact ids (waterz sizes its tables by the largest), C-contiguous, a copy: waterz merges
    # in place and hands back the same buffer at every threshold
    fragments = fastremap.renumber(np.asarray(fragments), preserve_zero=True)[0]
    working = np.ascontiguousarray(fragments, dtype=np.uint64).copy()
    nearest = np.ascontiguousarray(affs[list(nearest_channels(offsets))], dtype=np.float32)
    unassigned = fragments == 0
    fill = fill_unassigned and unassigned.any() and not unassigned.all()
    filled = nearest_fragment(fragments) if fill else fragments
    ordered = sorted(float(t) for t in thresholds)
    steps = waterz.agglomerate(
        nearest,
        ordered,
        fragments=working,
        scoring_function=scoring_function,
        discretize_queue=discretize_queue,
    )
    for threshold in ordered:
        with _c_stdout_silenced(quiet):  # only around waterz, never around the caller's code
            segmentation = next(steps).copy()
        if fill:
            # each fragment lies in one segment: the filled voxels take their fragment's segment
            segment_of = np.zeros(int(fragments.max()) + 1, dtype=np.uint64)
            segment_of[fragments[~unassigned]] = segmentation[~unassigned]
            segmentation[unassigned] = segment_of[filled[unassigned]]
        yield threshold, segmentation


@AGGLOMERATORS.register("mwatershed")
def mwatershed_agglomerate(
    affs: np.ndarray,
    offsets: Sequence[Sequence[int]],
    thresholds: Sequence[float],
    *,
    fill_unassigned: bool = True,
) -> Iterator[tuple[float, np.ndarray]]:
    """Mutex watershed (``pip install mwatershed``) on all offsets, long-range included.

    Works on voxels, not fragments: each threshold is the bias subtracted from the affinities
    (edges above it attract, below it repel). mwatershed stores the edge of ``v`` and
    ``v + o`` at ``v``, so our offsets are negated. It labels voxels without any attractive
    edge 0; ``fill_unassigned`` gives them the nearest segment, as for waterz.
    """
    try:
        import mwatershed
    except ImportError:
        raise AgglomerationError(
            "agglomeration method 'mwatershed' needs the mwatershed package, which is not "
            "installed: run `pip install mwatershed`, or use method='waterz'"
        ) from None
    mws_offsets = [[-step for step in offset] for offset in check_offsets(offsets)]
    for threshold in sorted(float(t) for t in thresholds):
        biased = np.asarray(affs, dtype=np.float64) - threshold
        labels = mwatershed.agglom(biased, mws_offsets)
        if fill_unassigned:
            labels = nearest_fragment(labels)
        yield threshold, fastremap.renumber(labels, preserve_zero=True)[0].astype(np.uint64)


def agglomerate(
    affs: np.ndarray,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    *,
    offsets: Sequence[Sequence[int]] = NEAREST_OFFSETS,
    method: str = "waterz",
    **options: Any,
) -> dict[float, np.ndarray]:
    """One uint64 segmentation per threshold, ascending: ``{threshold: labels}``.

    Higher thresholds merge more. ``options`` go to the method; for ``waterz`` (see
    :func:`waterz_agglomerate`): ``fragments``, ``fill_unassigned``, ``scoring_function``,
    ``discretize_queue``, ``quiet``.
    """
    offsets = check_offsets(offsets)
    affs = _check_affs(affs, offsets)
    agglomerator = AGGLOMERATORS.get(method)
    if len(thresholds) == 0 or not all(np.isfinite(float(t)) for t in thresholds):
        raise AgglomerationError(
            f"thresholds must be a non-empty list of numbers, got {thresholds}"
        )
    return dict(agglomerator(affs, offsets, thresholds, **options))
