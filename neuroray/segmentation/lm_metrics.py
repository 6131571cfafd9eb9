"""Light-microscopy neuron metrics: voxel overlap, surface distance, and tree distances to a gold SWC.

Voxel metrics (binary masks, z, y, x):

- :func:`dice`, :func:`iou` (from :mod:`neuroray.segmentation.metrics`);
- :func:`hd95`: 95th-percentile symmetric Hausdorff distance between the masks' surfaces, in the
  units of ``voxel_size`` (nm by default). Surface = mask voxels with a 6-neighbour outside the
  mask (``mask & ~binary_erosion(mask)``). ``d(A->B)`` are the Euclidean distances, in physical
  units, from every surface voxel of A to the nearest surface voxel of B: the values
  ``distance_transform_edt(~surface_B, sampling=voxel_size)`` holds at A's surface, computed
  exactly with a scipy KD-tree over the surface voxels instead (a neuron's surface is a few
  thousand voxels; the transform would visit every voxel of its bounding box, ~5x slower on an
  OP stack). ``hd95 = max(P95(d(A->B)), P95(d(B->A)))`` (MONAI's
  ``compute_hausdorff_distance(percentile=95)``; medpy pools both directions instead). Both
  empty: 0; exactly one empty: inf.

Tree metrics (:class:`~neuroray.platform.swc.SWCTree`, voxel coordinates by default, scaled to
physical units first: ``unit_nm=1000`` gives micrometres):

- :func:`skeletonize`: a binary prediction -> SWC forest with kimimaro (TEASAR), honouring the
  anisotropy.
- :func:`tree_distance`: Vaa3D ``neuron_distance`` (Peng et al. 2010; ``neuron_sim_scores.cpp``,
  ``neuron_score_rounding_nearest_neighbor``). For the directed pass 1 -> 2, every edge
  (child c, parent p) of tree 1 with length L is sampled at ``N = int(1 + L / step + 0.5)`` points
  ``c + j (p - c) / (N - 1)``, j = 0..N-1 (both ends included; one point, c, when N = 1), and each
  point gets ``d`` = its distance to the nearest *segment* of tree 2 (point-to-line-segment). With
  ``n12`` points, ``S12 = sum d``, and ``n12big`` / ``S12big`` the count and sum of ``d >= threshold``:

  - ESA (entire-structure average) ``= (S12 / n12 + S21 / n21) / 2`` (``esa_12``, ``esa_21`` are
    the directed terms);
  - DSA (different-structure average) ``= (S12big / n12big + S21big / n21big) / 2``, or the one
    defined term when only one direction has distances >= threshold, or 0 when neither has;
  - PDS (percentage of different structure) ``= (n12big / n12 + n21big / n21) / 2`` (a fraction,
    0..1).

  Vaa3D's defaults are ``step = 1`` and ``threshold = 2`` in the SWC's units; here both are in
  ``unit_nm`` after scaling by the voxel size (2 um and 1 um samples by default). Extension: a
  node without parent or children (an isolated point) counts as a zero-length segment, in both
  roles (Vaa3D would skip it). ESA/DSA are symmetric in the two trees by construction.
- :func:`node_scores`: node precision / recall / F1 at a distance threshold: a predicted node is a
  true positive when some gold node lies within ``threshold`` (``<=``), and a gold node is found
  when some predicted node does; precision = found predicted / predicted, recall = found gold /
  gold, F1 their harmonic mean. Not one-to-one. With ``resample_step`` both trees are first
  resampled to nodes at most that far apart (so node density does not bias the counts).

Empty trees: ESA = DSA = inf, PDS = 1 and P = R = F1 = 0 when exactly one tree is empty; all
distances 0 and P = R = F1 = 1 when both are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from neuroray.platform.swc import Coords, SWCTree, resample
from neuroray.segmentation.metrics import MetricError, dice, iou

__all__ = [
    "LMScores",
    "NodeScores",
    "TreeDistance",
    "dice",
    "hd95",
    "iou",
    "lm_scores",
    "node_scores",
    "point_segment_distances",
    "sample_segments",
    "skeletonize",
    "surface",
    "tree_distance",
]

# ----------------------------------------------------------------------------------------------
# voxel metrics


def surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with a face neighbour outside the mask (the border counts as outside)."""
    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _bounding_box(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    return tuple(
        slice(max(0, int(c.min()) - margin), int(c.max()) + 1 + margin) for c in np.nonzero(mask)
    )


def _surface_points(mask: np.ndarray, crop: tuple[slice, ...], voxel_size: Sequence[float]):
    """Physical positions of the surface voxels (a crop with a 1-voxel margin is exact)."""
    offset = np.asarray([s.start for s in crop])
    return (np.argwhere(surface(mask[crop])) + offset) * np.asarray(voxel_size)


def hd95(
    prediction: np.ndarray,
    target: np.ndarray,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    percentile: float = 95.0,
) -> float:
    """Symmetric percentile Hausdorff distance of two masks, in voxel_size units (module doc)."""
    prediction, target = np.asarray(prediction, dtype=bool), np.asarray(target, dtype=bool)
    if prediction.shape != target.shape or prediction.ndim != 3:
        raise MetricError(
            f"hd95 needs two 3D masks of one shape, got {prediction.shape} and {target.shape}"
        )
    size = tuple(float(v) for v in voxel_size)
    if len(size) != 3 or min(size) <= 0:
        raise MetricError(f"voxel_size must be three positive numbers (z, y, x), got {voxel_size}")
    has_p, has_t = bool(prediction.any()), bool(target.any())
    if not has_p and not has_t:
        return 0.0
    if not (has_p and has_t):
        return math.inf
    crop = _bounding_box(prediction | target)
    points_p = _surface_points(prediction, crop, size)
    points_t = _surface_points(target, crop, size)
    forward, _ = cKDTree(points_t).query(points_p, k=1)
    backward, _ = cKDTree(points_p).query(points_t, k=1)
    return float(max(np.percentile(forward, percentile), np.percentile(backward, percentile)))


# ----------------------------------------------------------------------------------------------
# skeletonisation


def skeletonize(
    mask: np.ndarray,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    scale: float = 1.5,
    const_nm: float = 1000.0,
    dust_voxels: int = 20,
    fix_branching: bool = True,
) -> SWCTree:
    """Skeleton forest of a binary mask (z, y, x) as an SWCTree in voxel coordinates.

    kimimaro's TEASAR runs on every connected component with ``dust_voxels`` or more voxels; the
    invalidation radius around each path is ``scale * boundary distance + const_nm`` (nm when
    voxel_size is in nm). Positions come back as voxel indices (x, y pixels, z slices, the gold
    SWC convention) and radii in x pixels.
    """
    import kimimaro

    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise MetricError(f"skeletonize needs a 3D mask (z, y, x), got shape {mask.shape}")
    size = np.asarray(voxel_size, dtype=np.float64).reshape(3)
    labels = np.ascontiguousarray(mask != 0, dtype=np.uint8)
    if not labels.any():
        return _empty_tree()
    skeletons = kimimaro.skeletonize(
        labels,
        teasar_params={"scale": scale, "const": const_nm},
        anisotropy=tuple(size),
        dust_threshold=dust_voxels,
        fix_branching=fix_branching,
        fix_borders=True,
        progress=False,
        parallel=1,
    )
    skeleton = skeletons.get(1)
    if skeleton is None or len(skeleton.vertices) == 0:
        return _empty_tree()
    zyx = skeleton.vertices.astype(np.float64) / size  # physical (array axis order) -> voxels
    radii = skeleton.radii.astype(np.float64) / size[2]
    return SWCTree.from_edges(zyx, skeleton.edges, radii, break_cycles=True)


def _empty_tree() -> SWCTree:
    return SWCTree(
        ids=np.zeros(0, np.int64),
        types=np.zeros(0, np.int32),
        xyz=np.zeros((0, 3)),
        radii=np.zeros(0),
        parents=np.zeros(0, np.int64),
    )


# ----------------------------------------------------------------------------------------------
# tree distances (Vaa3D neuron_distance)


def _physical(
    tree: SWCTree, voxel_size: Sequence[float], coords: Coords, unit_nm: float
) -> np.ndarray:
    return tree.positions_nm(voxel_size, coords, unit_nm) / float(unit_nm)


def _segments(tree: SWCTree, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) arrays of every edge (child -> parent) plus isolated nodes as points."""
    edges = tree.edges()
    isolated = np.flatnonzero((tree.parent_index < 0) & (tree.n_children() == 0))
    start = np.concatenate([pos[edges[:, 0]], pos[isolated]])
    end = np.concatenate([pos[edges[:, 1]], pos[isolated]])
    return start, end


def sample_segments(start: np.ndarray, end: np.ndarray, step: float = 1.0) -> np.ndarray:
    """Vaa3D's points along each segment: N = int(1 + L / step + 0.5), both ends included."""
    length = np.linalg.norm(end - start, axis=1)
    counts = (1 + length / step + 0.5).astype(np.int64)
    seg = np.repeat(np.arange(len(start)), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    j = np.arange(seg.size) - first
    t = np.where(counts[seg] > 1, j / np.maximum(counts[seg] - 1, 1), 0.0)
    return start[seg] + t[:, None] * (end[seg] - start[seg])


def _pair_distances(points: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Distance from points[i] to segment [start[i], end[i]], row by row."""
    delta = end - start
    length2 = np.einsum("ij,ij->i", delta, delta)
    rel = points - start
    t = np.einsum("ij,ij->i", rel, delta) / np.where(length2 > 0, length2, 1.0)
    t = np.where(length2 > 0, np.clip(t, 0.0, 1.0), 0.0)
    diff = rel - t[:, None] * delta
    return np.sqrt(np.einsum("ij,ij->i", diff, diff))


def point_segment_distances(
    points: np.ndarray, start: np.ndarray, end: np.ndarray, *, brute_force_pairs: int = 1_000_000
) -> np.ndarray:
    """Distance from each point to the nearest of the segments [start_i, end_i] (exact).

    Small problems compare every pair. Larger ones cut the segments into pieces no longer than
    the median segment, bound each point's answer by its nearest piece end (KD-tree), and only
    measure the pieces whose midpoint lies within that bound plus half a piece (no piece
    farther away can be closer), so a 50k-node skeleton costs seconds, not minutes.
    """
    points, start, end = (
        np.asarray(a, dtype=np.float64).reshape(-1, 3) for a in (points, start, end)
    )
    if len(points) * len(start) <= brute_force_pairs:
        pairs_p = np.repeat(np.arange(len(points)), len(start))
        pairs_s = np.tile(np.arange(len(start)), len(points))
        d = _pair_distances(points[pairs_p], start[pairs_s], end[pairs_s])
        return d.reshape(len(points), len(start)).min(axis=1)
    length = np.linalg.norm(end - start, axis=1)
    h = max(float(np.median(length)), 1e-9)
    pieces = np.maximum(1, np.ceil(length / h).astype(np.int64))
    seg = np.repeat(np.arange(len(start)), pieces)
    k = np.arange(seg.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    frac0, frac1 = k / pieces[seg], (k + 1) / pieces[seg]
    delta = end[seg] - start[seg]
    a, b = start[seg] + frac0[:, None] * delta, start[seg] + frac1[:, None] * delta
    piece_len = np.linalg.norm(b - a, axis=1)
    bound, _ = cKDTree(np.concatenate([a, b])).query(points, k=1)
    radius = bound + piece_len.max() / 2 + 1e-9
    candidates = cKDTree((a + b) / 2).query_ball_point(points, radius)
    counts = np.fromiter((len(c) for c in candidates), dtype=np.int64, count=len(points))
    flat = np.fromiter((i for c in candidates for i in c), dtype=np.int64, count=int(counts.sum()))
    owner = np.repeat(np.arange(len(points)), counts)  # sorted: one run per point
    d = _pair_distances(points[owner], a[flat], b[flat])
    best = bound.copy()
    found = counts > 0
    runs = (np.cumsum(counts) - counts)[found]
    best[found] = np.minimum(bound[found], np.minimum.reduceat(d, runs))
    return best


@dataclass(frozen=True)
class TreeDistance:
    """Vaa3D neuron_distance scores (distances in ``unit_nm``; PDS a fraction)."""

    esa: float
    dsa: float
    pds: float
    esa_12: float
    esa_21: float
    pds_12: float
    pds_21: float
    n_12: int
    n_21: int
    threshold: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _directed(points: np.ndarray, start: np.ndarray, end: np.ndarray, threshold: float):
    d = point_segment_distances(points, start, end)
    big = d >= threshold
    return float(d.sum()), d.size, float(d[big].sum()), int(big.sum())


def tree_distance(
    tree_1: SWCTree,
    tree_2: SWCTree,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    coords: Coords = "voxel",
    unit_nm: float = 1000.0,
    threshold: float = 2.0,
    step: float = 1.0,
) -> TreeDistance:
    """ESA / DSA / PDS between two trees (see the module docstring for the exact formulas)."""
    if not threshold > 0 or not step > 0:
        raise MetricError(f"threshold ({threshold}) and step ({step}) must be > 0")
    if len(tree_1) == 0 or len(tree_2) == 0:
        both = len(tree_1) == len(tree_2) == 0
        value = 0.0 if both else math.inf
        frac = 0.0 if both else 1.0
        return TreeDistance(value, value, frac, value, value, frac, frac, 0, 0, threshold)
    pos_1 = _physical(tree_1, voxel_size, coords, unit_nm)
    pos_2 = _physical(tree_2, voxel_size, coords, unit_nm)
    seg_1, seg_2 = _segments(tree_1, pos_1), _segments(tree_2, pos_2)
    s12, n12, s12big, n12big = _directed(sample_segments(*seg_1, step), *seg_2, threshold)
    s21, n21, s21big, n21big = _directed(sample_segments(*seg_2, step), *seg_1, threshold)
    big_means = [s / n for s, n in ((s12big, n12big), (s21big, n21big)) if n > 0]
    return TreeDistance(
        esa=(s12 / n12 + s21 / n21) / 2,
        dsa=float(np.mean(big_means)) if big_means else 0.0,
        pds=(n12big / n12 + n21big / n21) / 2,
        esa_12=s12 / n12,
        esa_21=s21 / n21,
        pds_12=n12big / n12,
        pds_21=n21big / n21,
        n_12=n12,
        n_21=n21,
        threshold=threshold,
    )


# ----------------------------------------------------------------------------------------------
# node precision / recall


def _resampled(
    tree: SWCTree, step: float, voxel_size: Sequence[float], coords: Coords, unit_nm: float
) -> SWCTree:
    """The tree with nodes at most ``step`` (in unit_nm) apart along every path."""
    if len(tree) == 0:
        return tree
    if coords == "voxel":
        spacing = tuple(float(v) / unit_nm for v in np.asarray(voxel_size, float)[::-1])
    else:
        spacing = (1.0, 1.0, 1.0)
    return resample(tree, step, spacing_xyz=spacing)


@dataclass(frozen=True)
class NodeScores:
    precision: float
    recall: float
    f1: float
    n_pred: int
    n_gold: int
    threshold: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def node_scores(
    prediction: SWCTree,
    gold: SWCTree,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    coords: Coords = "voxel",
    unit_nm: float = 1000.0,
    threshold: float = 2.0,
    resample_step: float | None = None,
) -> NodeScores:
    """Node precision / recall / F1 at ``threshold`` (in ``unit_nm``), see the module docstring."""
    if resample_step is not None:
        prediction = _resampled(prediction, resample_step, voxel_size, coords, unit_nm)
        gold = _resampled(gold, resample_step, voxel_size, coords, unit_nm)
    n_pred, n_gold = len(prediction), len(gold)
    if n_pred == 0 or n_gold == 0:
        value = 1.0 if n_pred == n_gold == 0 else 0.0
        return NodeScores(value, value, value, n_pred, n_gold, threshold)
    pred_pos = _physical(prediction, voxel_size, coords, unit_nm)
    gold_pos = _physical(gold, voxel_size, coords, unit_nm)
    d_pred, _ = cKDTree(gold_pos).query(pred_pos, k=1)
    d_gold, _ = cKDTree(pred_pos).query(gold_pos, k=1)
    precision = float(np.mean(d_pred <= threshold))
    recall = float(np.mean(d_gold <= threshold))
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return NodeScores(precision, recall, f1, n_pred, n_gold, threshold)


# ----------------------------------------------------------------------------------------------
# everything at once


@dataclass(frozen=True)
class LMScores:
    """Voxel and tree scores of one predicted mask against its gold mask and SWC."""

    dice: float
    iou: float
    hd95_um: float
    esa_um: float
    dsa_um: float
    pds: float
    node_precision: float
    node_recall: float
    node_f1: float
    skeleton_nodes: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def lm_scores(
    prediction: np.ndarray,
    gold_mask: np.ndarray,
    gold_tree: SWCTree,
    voxel_size: Sequence[float],
    *,
    threshold_um: float = 2.0,
    skeleton: SWCTree | None = None,
    **skeleton_options: float,
) -> LMScores:
    """Dice / IoU / HD95 against ``gold_mask`` and ESA / DSA / PDS / node P-R-F1 of the
    prediction's skeleton against ``gold_tree`` (voxel coordinates), distances in micrometres."""
    prediction = np.asarray(prediction) != 0
    if skeleton is None:
        skeleton = skeletonize(prediction, voxel_size, **skeleton_options)
    distance = tree_distance(skeleton, gold_tree, voxel_size, threshold=threshold_um)
    nodes = node_scores(skeleton, gold_tree, voxel_size, threshold=threshold_um, resample_step=1.0)
    return LMScores(
        dice=dice(prediction, gold_mask),
        iou=iou(prediction, gold_mask),
        hd95_um=hd95(prediction, gold_mask, voxel_size) / 1000.0,
        esa_um=distance.esa,
        dsa_um=distance.dsa,
        pds=distance.pds,
        node_precision=nodes.precision,
        node_recall=nodes.recall,
        node_f1=nodes.f1,
        skeleton_nodes=len(skeleton),
    )
