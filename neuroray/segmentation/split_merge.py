"""Where a segmentation splits and merges neurons: matches, error voxels, the worst objects.

From the contingency table of (ground truth, segment) voxel counts (ground truth 0 ignored, as
VOI ignores it), every ground-truth object is matched to the segment that covers most of it,
and every segment (other than 0) to the ground-truth object it covers most:

- **split voxels** of an object: its voxels outside its matched segment (in other segments, or
  unsegmented, id 0); the object's split size is their count;
- **merge voxels** of a segment: its voxels on other objects than its matched one; the
  segment's merge size is their count.

These are the errors VOI's split and merge terms measure, as voxels one can look at: the
evaluate figure marks them and ``metrics.json`` lists the worst objects with their ids and a
voxel inside the error, so a viewer can jump there. Prediction segments are coloured by their
matched object, so a correct segment has its object's colour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import fastremap
import numpy as np

from neuroray.preview import label_colours
from neuroray.segmentation.metrics import ContingencyTable, contingency_table


def _best_per_group(groups: np.ndarray, others: np.ndarray, counts: np.ndarray):
    """For each group index: the partner with the largest count, that count, and the total."""
    if not len(groups):
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, empty
    order = np.lexsort((-counts, groups))  # by group, largest count first
    groups, others, counts = groups[order], others[order], counts[order]
    first = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    totals = np.add.reduceat(counts, first)
    return groups[first], others[first], counts[first], totals


@dataclass(frozen=True)
class SplitMerge:
    """Matches between ground-truth objects and segments, and their error sizes (voxels)."""

    gt_ids: np.ndarray  # objects
    gt_match: np.ndarray  # the segment covering most of each object
    gt_sizes: np.ndarray
    split_sizes: np.ndarray  # voxels of each object outside its matched segment
    seg_ids: np.ndarray  # segments other than 0 that cover labelled voxels
    seg_match: np.ndarray  # the object each segment covers most
    merge_sizes: np.ndarray  # voxels of each segment on other objects than its match
    table: ContingencyTable

    @classmethod
    def of(cls, segmentation: np.ndarray, gt: np.ndarray) -> SplitMerge:
        table = contingency_table(segmentation, gt)
        gt_ids, seg_ids = table.gt_ids, table.seg_ids
        rows, best_cols, best, totals = _best_per_group(table.rows, table.cols, table.counts)
        segmented = seg_ids[table.cols] != 0
        cols, best_rows, seg_best, seg_totals = _best_per_group(
            table.cols[segmented], table.rows[segmented], table.counts[segmented]
        )
        return cls(
            gt_ids=gt_ids[rows],
            gt_match=seg_ids[best_cols],
            gt_sizes=totals,
            split_sizes=totals - best,
            seg_ids=seg_ids[cols],
            seg_match=gt_ids[best_rows],
            merge_sizes=seg_totals - seg_best,
            table=table,
        )

    # -- per-voxel maps ---------------------------------------------------------------------
    def split_mask(self, segmentation: np.ndarray, gt: np.ndarray) -> np.ndarray:
        """True where a labelled voxel is outside its object's matched segment."""
        matched = _lookup(gt, self.gt_ids, self.gt_match, segmentation.dtype)
        return (gt != 0) & (segmentation != matched)

    def merge_mask(self, segmentation: np.ndarray, gt: np.ndarray) -> np.ndarray:
        """True where a segment (not 0) covers another object than its matched one."""
        matched = _lookup(segmentation, self.seg_ids, self.seg_match, gt.dtype)
        return (gt != 0) & (segmentation != 0) & (gt != matched)

    def prediction_colours(self, segmentation: np.ndarray) -> np.ndarray:
        """RGB of each voxel's segment: its matched object's colour (as the ground truth is
        drawn), or a colour of its own when it covers no labelled voxel; 0 stays black."""
        matched = _lookup(segmentation, self.seg_ids, self.seg_match, np.uint64, missing=0)
        rgb = label_colours(matched)
        own = (matched == 0) & (segmentation != 0)
        if own.any():
            rgb[own] = label_colours(segmentation[own].astype(np.uint64), seed=7)
        return rgb

    # -- the worst objects ------------------------------------------------------------------
    def worst_splits(
        self, segmentation: np.ndarray, gt: np.ndarray, k: int = 10, origin=(0, 0, 0)
    ) -> list[dict[str, Any]]:
        """The ``k`` objects with most split voxels: ids, sizes, the segments they fall into
        (largest first, 0 left out) and a voxel (z, y, x, layer coordinates) of the error."""
        worst = []
        for i in _top(self.split_sizes, k):
            inside = gt == self.gt_ids[i]
            error = inside & (segmentation != self.gt_match[i])
            pieces = self._pieces(segmentation[inside])
            worst.append({
                "gt_id": int(self.gt_ids[i]),
                "split_voxels": int(self.split_sizes[i]),
                "gt_voxels": int(self.gt_sizes[i]),
                "segment_ids": pieces,
                "at_zyx": _representative(error, origin),
            })  # fmt: skip
        return worst

    def worst_merges(
        self, segmentation: np.ndarray, gt: np.ndarray, k: int = 10, origin=(0, 0, 0)
    ) -> list[dict[str, Any]]:
        """The ``k`` segments with most merge voxels: ids, the objects they join (largest first)
        and a voxel (z, y, x, layer coordinates) of the error."""
        worst = []
        for i in _top(self.merge_sizes, k):
            inside = (segmentation == self.seg_ids[i]) & (gt != 0)
            error = inside & (gt != self.seg_match[i])
            worst.append({
                "segment_id": int(self.seg_ids[i]),
                "merge_voxels": int(self.merge_sizes[i]),
                "gt_ids": self._pieces(gt[inside]),
                "at_zyx": _representative(error, origin),
            })  # fmt: skip
        return worst

    @staticmethod
    def _pieces(ids: np.ndarray, limit: int = 10) -> list[int]:
        values, counts = fastremap.unique(ids, return_counts=True)
        keep = values != 0
        values, counts = values[keep], counts[keep]
        return [int(v) for v in values[np.argsort(-counts, kind="stable")][:limit]]


def _top(sizes: np.ndarray, k: int) -> list[int]:
    order = np.argsort(-sizes, kind="stable")[:k]
    return [int(i) for i in order if sizes[i] > 0]


def _lookup(
    labels: np.ndarray, keys: np.ndarray, values: np.ndarray, dtype: Any, missing: Any = None
) -> np.ndarray:
    """``values[keys == label]`` for every voxel; ``missing`` (default: the label itself, so it
    never differs from itself) where a label is not among ``keys``."""
    mapping = {int(k): int(v) for k, v in zip(keys, values, strict=True)}
    source = np.ascontiguousarray(labels).astype(np.uint64, copy=False)
    if missing is not None:
        present = np.isin(source, np.asarray(list(mapping), dtype=np.uint64))
        out = fastremap.remap(source, mapping, preserve_missing_labels=True)
        out[~present] = missing
        return out.astype(dtype, copy=False)
    return fastremap.remap(source, mapping, preserve_missing_labels=True).astype(dtype, copy=False)


def _representative(mask: np.ndarray, origin) -> list[int] | None:
    """The voxel of ``mask`` nearest its centroid, in layer coordinates (``origin`` added)."""
    points = np.argwhere(mask)
    if not len(points):
        return None
    centre = points.mean(axis=0)
    nearest = points[np.argmin(((points - centre) ** 2).sum(axis=1))]
    return [int(a + b) for a, b in zip(nearest, origin, strict=True)]
