"""Segmentation quality: VOI and adapted Rand error (ARAND) on one sparse contingency table, plus
Dice / IoU for binary tasks.

Every instance metric here reads :class:`ContingencyTable`: the voxel counts of each pair
(ground-truth id, segment id) that occurs, built once per volume in linear time (ids compacted
with fastremap, pairs counted with ``fastremap.unique``), so any uint64 ids and 250^3 volumes are
cheap. Ground-truth label 0 (and voxels outside an optional mask, or inside the CREMI border
mask) is ignored; segment label 0 is an ordinary segment.

- **VOI** (log2): ``voi_split = H(seg | gt)`` (over-segmentation), ``voi_merge = H(gt | seg)``
  (under-segmentation), as CREMI, waterz and ``skimage.metrics.variation_of_information``.
- **ARAND**, by :data:`RAND_CONVENTIONS`:

  - ``"cremi"``: SNEMI3D / CREMI (``cremi.evaluation.adapted_rand``), the numbers papers report.
    Sums of squared counts; segment label 0 inside the ground truth counts as singletons, with
    CREMI's normalisation by the whole volume's voxel count kept as it is. Equal to
    ``waterz.evaluate`` whenever the segmentation has no 0 inside the ground truth.
  - ``"pairs"``: counts pairs of distinct voxels, ``n (n - 1)``, as
    ``skimage.metrics.adapted_rand_error``; segment 0 is an ordinary segment.

  ``rand_split`` is the Rand recall (1 = no false split), ``rand_merge`` the Rand precision
  (1 = no false merge), as waterz names them; ``arand = 1 - F1`` of the two.
- **CREMI score** ``sqrt(voi * arand)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import fastremap
import numpy as np
from scipy import ndimage, sparse

from neuroray.errors import NeurorayError
from neuroray.registry import Registry


class MetricError(NeurorayError):
    """Volumes that cannot be compared (shapes differ, non-integer ids, nothing labelled)."""


@dataclass(frozen=True)
class ContingencyTable:
    """Voxel counts of every (ground truth, segment) pair that occurs, as sparse triplets.

    ``rows`` / ``cols`` index ``gt_ids`` / ``seg_ids`` (the original labels, sorted); only
    counted voxels (ground truth not ignored) are in ``counts``. ``n_voxels`` is the size of the
    whole volume, counted or not (CREMI's ARAND uses it).
    """

    rows: np.ndarray
    cols: np.ndarray
    counts: np.ndarray
    gt_ids: np.ndarray
    seg_ids: np.ndarray
    n_voxels: int

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def gt_sizes(self) -> np.ndarray:
        return np.bincount(self.rows, weights=self.counts, minlength=len(self.gt_ids))

    def seg_sizes(self) -> np.ndarray:
        return np.bincount(self.cols, weights=self.counts, minlength=len(self.seg_ids))

    def to_sparse(self) -> sparse.csr_array:
        """``[gt index, segment index] -> count`` (the layout of skimage's contingency_table
        after compacting ids)."""
        shape = (len(self.gt_ids), len(self.seg_ids))
        return sparse.csr_array((self.counts, (self.rows, self.cols)), shape=shape)


def _check_pair(segmentation: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    segmentation, gt = np.asarray(segmentation), np.asarray(gt)
    if segmentation.shape != gt.shape:
        raise MetricError(
            f"segmentation {segmentation.shape} and ground truth {gt.shape} differ in shape; "
            "crop both to the same box"
        )
    for name, array in (("segmentation", segmentation), ("ground truth", gt)):
        if array.dtype.kind not in "iub":
            raise MetricError(f"{name} must hold integer ids, got dtype {array.dtype}")
    return segmentation, gt


def contingency_table(
    segmentation: np.ndarray,
    gt: np.ndarray,
    *,
    mask: np.ndarray | None = None,
) -> ContingencyTable:
    """Count voxels per (gt, segment) pair, ignoring gt 0 and voxels where ``mask`` is False."""
    segmentation, gt = _check_pair(segmentation, gt)
    gt_compact, gt_map = fastremap.renumber(gt.ravel(), preserve_zero=True, in_place=False)
    seg_compact, seg_map = fastremap.renumber(segmentation.ravel(), preserve_zero=False)
    n_seg = int(seg_compact.max()) + 1 if seg_compact.size else 1
    # pair key: gt index * n_seg + seg index; ignored voxels get gt index 0 and are dropped
    key = gt_compact.astype(np.int64) * n_seg + seg_compact
    if mask is not None:
        if np.shape(mask) != gt.shape:
            raise MetricError(f"mask {np.shape(mask)} must have the volumes' shape {gt.shape}")
        key[~np.asarray(mask, dtype=bool).ravel()] = -1
    pairs, counts = fastremap.unique(key, return_counts=True)
    keep = pairs >= n_seg  # gt index >= 1
    pairs, counts = pairs[keep], counts[keep].astype(np.int64)
    gt_index, seg_index = np.divmod(pairs, n_seg)
    # compact both sides to the ids that are counted, keeping the original labels
    gt_used, rows = np.unique(gt_index, return_inverse=True)
    seg_used, cols = np.unique(seg_index, return_inverse=True)
    return ContingencyTable(
        rows=rows.astype(np.int64),
        cols=cols.astype(np.int64),
        counts=counts,
        gt_ids=_original_labels(gt_map, gt_used),
        seg_ids=_original_labels(seg_map, seg_used),
        n_voxels=int(gt.size),
    )


def _original_labels(mapping: dict, compact: np.ndarray) -> np.ndarray:
    """The original ids of compact indices, from fastremap.renumber's {original: compact}."""
    originals = np.fromiter(mapping.keys(), dtype=np.int64 if _signed(mapping) else np.uint64)
    indices = np.fromiter(mapping.values(), dtype=np.int64)
    lookup = np.zeros(int(indices.max(initial=0)) + 1, dtype=originals.dtype)
    lookup[indices] = originals
    return lookup[compact]


def _signed(mapping: dict) -> bool:
    return any(label < 0 for label in mapping)


def _entropy(probabilities: np.ndarray) -> float:
    p = probabilities[probabilities > 0]
    return float(-(p * np.log2(p)).sum())


def voi_from_table(table: ContingencyTable) -> tuple[float, float]:
    """``(voi_split, voi_merge) = (H(seg|gt), H(gt|seg))`` in bits."""
    total = table.total
    joint = _entropy(table.counts / total)
    split = joint - _entropy(table.gt_sizes() / total)
    merge = joint - _entropy(table.seg_sizes() / total)
    return max(split, 0.0), max(merge, 0.0)  # clip -1e-15 rounding


RandConvention = Callable[[ContingencyTable], tuple[float, float]]
RAND_CONVENTIONS: Registry[RandConvention] = Registry("adapted Rand convention")


@RAND_CONVENTIONS.register("cremi")
def _rand_cremi(table: ContingencyTable) -> tuple[float, float]:
    """(recall, precision) of SNEMI3D / CREMI: squared counts, segment 0 as singletons."""
    counts = table.counts.astype(np.float64)
    on_zero = table.seg_ids[table.cols] == 0
    singletons = counts[on_zero].sum() / table.n_voxels  # CREMI's c / n, kept verbatim
    seg_sizes = table.seg_sizes()[table.seg_ids != 0]
    sum_gt = float((table.gt_sizes() ** 2).sum())
    sum_seg = float((seg_sizes**2).sum()) + singletons
    sum_both = float((counts[~on_zero] ** 2).sum()) + singletons
    return _ratio(sum_both, sum_gt), _ratio(sum_both, sum_seg)


@RAND_CONVENTIONS.register("pairs")
def _rand_pairs(table: ContingencyTable) -> tuple[float, float]:
    """(recall, precision) over pairs of distinct voxels, as scikit-image."""
    counts = table.counts.astype(np.float64)
    gt_sizes, seg_sizes = table.gt_sizes(), table.seg_sizes()
    sum_gt = float(gt_sizes @ gt_sizes - gt_sizes.sum())
    sum_seg = float(seg_sizes @ seg_sizes - seg_sizes.sum())
    sum_both = float(counts @ counts - counts.sum())
    return _ratio(sum_both, sum_gt), _ratio(sum_both, sum_seg)


def _ratio(numerator: float, denominator: float) -> float:
    # no pair to get wrong (every voxel alone): nothing was split or merged
    return 1.0 if denominator == 0 else float(numerator / denominator)


def _f1(recall: float, precision: float) -> float:
    return 0.0 if recall + precision == 0 else 2 * recall * precision / (recall + precision)


@dataclass(frozen=True)
class SegmentationScores:
    """VOI (bits) and ARAND (lower is better) of a segmentation against ground truth."""

    voi_split: float
    voi_merge: float
    voi: float
    rand_split: float
    rand_merge: float
    arand: float
    cremi_score: float
    convention: str
    n_voxels: int
    """Voxels that were scored (ground truth not ignored)."""

    def as_dict(self) -> dict[str, float | str | int]:
        return asdict(self)


def scores_from_table(table: ContingencyTable, convention: str = "cremi") -> SegmentationScores:
    """All instance scores from one contingency table."""
    if table.total == 0:
        raise MetricError(
            "the ground truth has no labelled voxel to score (all 0, masked or border-masked); "
            "check the ground-truth volume, the mask and the border threshold"
        )
    voi_split, voi_merge = voi_from_table(table)
    rand_split, rand_merge = RAND_CONVENTIONS.get(convention)(table)
    arand = 1.0 - _f1(rand_split, rand_merge)
    voi = voi_split + voi_merge
    return SegmentationScores(
        voi_split=voi_split,
        voi_merge=voi_merge,
        voi=voi,
        rand_split=rand_split,
        rand_merge=rand_merge,
        arand=arand,
        cremi_score=math.sqrt(voi * arand),
        convention=convention,
        n_voxels=table.total,
    )


def cremi_border_mask(
    gt: np.ndarray,
    border_threshold_nm: float,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """True where CREMI ignores a voxel: within ``border_threshold_nm`` of a label boundary in
    its own z section (a pixel is on a boundary when one of its 4 in-plane neighbours differs;
    the array's faces are not boundaries). Distances are in y voxels, as CREMI's; a section with
    no boundary at all ignores nothing."""
    gt = np.asarray(gt)
    if gt.ndim != 3:
        raise MetricError(f"ground truth must be 3D (z, y, x), got shape {gt.shape}")
    if voxel_size[1] != voxel_size[2]:
        raise MetricError(f"CREMI's border mask needs equal y and x voxel sizes, got {voxel_size}")
    max_distance = max(float(border_threshold_nm) / float(voxel_size[1]), 0.0)
    ignored = np.empty(gt.shape, dtype=bool)
    for z, section in enumerate(gt):
        padded = np.pad(section, 1, mode="edge")
        interior = (
            (section == padded[:-2, 1:-1])
            & (section == padded[2:, 1:-1])
            & (section == padded[1:-1, :-2])
            & (section == padded[1:-1, 2:])
        )
        # a section without any boundary has nothing to ignore (CREMI's code would mask it all)
        ignored[z] = (
            False if interior.all() else ndimage.distance_transform_edt(interior) <= max_distance
        )
    return ignored


def evaluate_segmentation(
    segmentation: np.ndarray,
    gt: np.ndarray,
    *,
    convention: str = "cremi",
    mask: np.ndarray | None = None,
    border_threshold_nm: float | None = None,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
) -> SegmentationScores:
    """VOI, ARAND and CREMI score of ``segmentation`` against ``gt`` (label 0 ignored).

    ``mask`` (True = score) restricts the evaluation; ``border_threshold_nm`` (with
    ``voxel_size`` in nm, z, y, x) also ignores the ground truth's label borders as CREMI does
    (CREMI skips it when the threshold is 0 or None).
    """
    segmentation, gt = _check_pair(segmentation, gt)
    if border_threshold_nm:
        keep = ~cremi_border_mask(gt, border_threshold_nm, voxel_size)
        mask = keep if mask is None else keep & np.asarray(mask, dtype=bool)
    return scores_from_table(contingency_table(segmentation, gt, mask=mask), convention)


def voi(segmentation: np.ndarray, gt: np.ndarray, **kwargs: object) -> tuple[float, float]:
    """``(voi_split, voi_merge)`` in bits; keywords as :func:`evaluate_segmentation`."""
    scores = evaluate_segmentation(segmentation, gt, **kwargs)  # type: ignore[arg-type]
    return scores.voi_split, scores.voi_merge


def adapted_rand_error(
    segmentation: np.ndarray, gt: np.ndarray, *, convention: str = "cremi", **kwargs: object
) -> float:
    """ARAND in the given convention; keywords as :func:`evaluate_segmentation`."""
    return evaluate_segmentation(segmentation, gt, convention=convention, **kwargs).arand  # type: ignore[arg-type]


def _binary_counts(
    prediction: np.ndarray, target: np.ndarray, mask: np.ndarray | None
) -> tuple[int, int, int]:
    prediction, target = np.asarray(prediction, dtype=bool), np.asarray(target, dtype=bool)
    if prediction.shape != target.shape:
        raise MetricError(f"prediction {prediction.shape} and target {target.shape} differ")
    if mask is not None:
        keep = np.asarray(mask, dtype=bool)
        prediction, target = prediction[keep], target[keep]
    both = int(np.count_nonzero(prediction & target))
    return both, int(np.count_nonzero(prediction)), int(np.count_nonzero(target))


def dice(prediction: np.ndarray, target: np.ndarray, *, mask: np.ndarray | None = None) -> float:
    """Dice of two binary masks (non-zero = foreground); 1.0 when both are empty."""
    both, predicted, actual = _binary_counts(prediction, target, mask)
    return 1.0 if predicted + actual == 0 else 2.0 * both / (predicted + actual)


def iou(prediction: np.ndarray, target: np.ndarray, *, mask: np.ndarray | None = None) -> float:
    """Intersection over union (Jaccard) of two binary masks; 1.0 when both are empty."""
    both, predicted, actual = _binary_counts(prediction, target, mask)
    union = predicted + actual - both
    return 1.0 if union == 0 else both / union
