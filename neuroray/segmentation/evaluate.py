"""``neuroray evaluate``: score a segmentation layer against ground truth, with a picture.

Writes (with ``--out``) ``metrics.json``: the task's metrics, and for instance tasks (EM) the
worst split objects and worst merging segments by voxel count, with their ids and a voxel inside
each error (:mod:`neuroray.segmentation.split_merge`); and ``preview.png``: titled panels (image,
ground truth, prediction coloured by matched object, error map) on the xy, xz and yz planes
through the box's centre (:mod:`neuroray.segmentation.evaluation_figure`).

``--task lm`` with a gold SWC (``swc=``, or an ``.swc`` file as the labels) adds the tree
metrics of :func:`neuroray.segmentation.lm_metrics.lm_scores`: ESA / DSA / PDS and node
precision / recall / F1 of the prediction's skeleton, and HD95. The SWC's voxel coordinates are
those of the evaluated box (its first voxel is 0, 0, 0: the stack's own frame when ``roi`` is a
stack of a ``data lm`` layer); as labels it is rasterised the way ``data lm`` does.

The segmentation and the ground truth must have the same voxel size (a layer whose format
carried none is taken to share the other's).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neuroray.errors import ConfigError, NeurorayError
from neuroray.platform.box import Box
from neuroray.platform.lm_data import DEFAULT_RADIUS_FLOOR_PX
from neuroray.platform.swc import rasterize, read_swc
from neuroray.platform.volume import open_volume
from neuroray.segmentation.evaluation_figure import write_figure
from neuroray.segmentation.lm_metrics import lm_scores
from neuroray.segmentation.split_merge import SplitMerge
from neuroray.segmentation.tasks import get_task

BINARY_ALIAS = "binary"
"""``--task binary``: score any foreground mask (the metrics of the mito and lm tasks)."""


@dataclass
class EvaluationReport:
    task: str
    metrics: dict[str, float]
    roi: list[int]
    files: dict[str, str] = field(default_factory=dict)
    voxel_size: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    worst_splits: list[dict[str, Any]] = field(default_factory=list)
    worst_merges: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> str:
        rows = [f"{'metric':<14} {'value':>10}"]
        rows += [f"{k:<14} {v:>10.4f}" for k, v in self.metrics.items()]
        for entry in self.worst_splits[:3]:
            rows.append(
                f"worst split    gt {entry['gt_id']}: {entry['split_voxels']} voxels outside its "
                f"segment, in segments {entry['segment_ids'][:5]}, at z,y,x {entry['at_zyx']}"
            )
        for entry in self.worst_merges[:3]:
            rows.append(
                f"worst merge    segment {entry['segment_id']}: {entry['merge_voxels']} voxels "
                f"on gt {entry['gt_ids'][:5]}, at z,y,x {entry['at_zyx']}"
            )
        rows += [f"{k:<14} {v}" for k, v in self.files.items()]
        return "\n".join(rows)


def evaluate_arrays(
    segmentation: np.ndarray,
    labels: np.ndarray,
    task: str = "em",
    *,
    voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0),
    border_threshold_nm: float | None = None,
) -> dict[str, float]:
    """The task's metrics (see segmentation/tasks.py): EM VOI split / merge / total, ARAND,
    CREMI score (GT 0 ignored); binary tasks Dice, IoU. ``binary`` names any mask task."""
    return get_task(_task_name(task)).evaluate(
        segmentation, labels, voxel_size=voxel_size, border_threshold_nm=border_threshold_nm
    )


def _task_name(task: str) -> str:
    return "mito" if task == BINARY_ALIAS else task


def evaluate_layers(
    segmentation_url: str,
    labels_url: str,
    *,
    task: str = "em",
    roi: tuple[int, ...] | None = None,
    image: str | None = None,
    out: str | None = None,
    border_threshold_nm: float | None = None,
    swc: str | None = None,
    worst: int = 10,
) -> EvaluationReport:
    """Read both layers (within ``roi``), score them, and write metrics.json + preview.png.

    ``labels_url`` may be an ``.swc`` file (``--task lm``): the gold tree, rasterised as labels.
    Every argument is checked before any voxel is read or any file written.
    """
    get_task(_task_name(task))  # an unknown task fails before any voxel is read
    _check_arguments(roi, out, border_threshold_nm)
    if labels_url.lower().endswith(".swc"):
        swc, labels_url = labels_url, None
    if swc is not None and task != "lm":
        raise ConfigError(f"an SWC ground truth ({swc}) is scored by --task lm, not {task!r}")
    gold_tree = read_swc(swc) if swc is not None else None  # a malformed SWC fails here
    seg_volume = open_volume(segmentation_url)
    gt_volume = open_volume(labels_url) if labels_url is not None else None
    if gt_volume is not None and seg_volume.shape != gt_volume.shape:
        raise NeurorayError(
            f"segmentation {seg_volume.shape} and labels {gt_volume.shape} differ in shape; "
            "evaluate aligned layers (use --roi on the common region)"
        )
    voxel_size = _common_voxel_size(seg_volume, gt_volume)
    image_volume = open_volume(image) if image is not None else None
    if image_volume is not None and image_volume.shape != seg_volume.shape:
        raise ConfigError(
            f"--image {image} has shape {image_volume.shape} but the segmentation has "
            f"{seg_volume.shape}; the preview needs the image the segmentation was made from"
        )
    box = Box.from_list(roi) if roi else seg_volume.bounds
    if not seg_volume.bounds.contains(box):
        raise ConfigError(
            f"--roi {box.to_list()} reaches outside the layers' bounds {seg_volume.bounds.to_list()}"
        )
    seg = seg_volume.read(box)
    if gt_volume is not None:
        gt = gt_volume.read(box)
    else:
        gt = rasterize(gold_tree, box.shape, voxel_size, radius_floor=DEFAULT_RADIUS_FLOOR_PX)
        gt = gt.astype(np.uint8)
    metrics = evaluate_arrays(
        seg, gt, task, voxel_size=voxel_size, border_threshold_nm=border_threshold_nm
    )
    if gold_tree is not None:
        scores = lm_scores(seg, gt != 0, gold_tree, voxel_size).as_dict()
        metrics.update({k: float(v) for k, v in scores.items() if k not in metrics})
    report = EvaluationReport(
        task=task, metrics=metrics, roi=box.to_list(), voxel_size=list(voxel_size)
    )
    analysis = None
    if get_task(_task_name(task)).instances:
        analysis = SplitMerge.of(seg, gt)
        report.worst_splits = analysis.worst_splits(seg, gt, worst, origin=box.start)
        report.worst_merges = analysis.worst_merges(seg, gt, worst, origin=box.start)
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        raw = image_volume.read(box) if image_volume is not None else None
        if raw is not None and raw.ndim == 4:
            raw = raw[0]  # the first channel
        png = write_figure(
            folder / "preview.png",
            seg,
            gt,
            image=raw,
            analysis=analysis,
            voxel_size=voxel_size,
            title=_figure_title(report),
        )
        report.files["preview"] = str(png)
        (folder / "metrics.json").write_text(json.dumps(_payload(report), indent=2))
        report.files["metrics"] = str(folder / "metrics.json")
    return report


def _common_voxel_size(seg_volume, gt_volume) -> tuple[float, float, float]:  # noqa: ANN001
    """The voxel size both layers share; a one-line error when they differ. A layer whose format
    carried no voxel size (``voxel_size_defaulted``) takes the other's."""
    seg_size = tuple(seg_volume.voxel_size)
    if gt_volume is None:
        return seg_size
    gt_size = tuple(gt_volume.voxel_size)
    if getattr(gt_volume, "voxel_size_defaulted", False):
        return seg_size
    if getattr(seg_volume, "voxel_size_defaulted", False):
        return gt_size
    if not np.allclose(seg_size, gt_size, rtol=1e-3):
        raise ConfigError(
            f"segmentation voxel size {_nm(seg_size)} nm differs from the ground truth's "
            f"{_nm(gt_size)} nm (z, y, x); evaluate layers on the same grid"
        )
    return gt_size


def _nm(size: tuple[float, ...]) -> str:
    return "x".join(f"{v:g}" for v in size)


def _figure_title(report: EvaluationReport) -> str:
    shown = [k for k in ("voi", "voi_split", "voi_merge", "arand", "dice", "esa_um") if k in
             report.metrics]  # fmt: skip
    scores = ", ".join(f"{k} {report.metrics[k]:.3f}" for k in shown)
    return f"{report.task}: {scores}  (roi {report.roi}, voxel {_nm(tuple(report.voxel_size))} nm)"


def _check_arguments(
    roi: tuple[int, ...] | None, out: str | None, border_threshold_nm: float | None
) -> None:
    if border_threshold_nm is not None and not (
        math.isfinite(border_threshold_nm) and border_threshold_nm >= 0
    ):
        raise ConfigError(
            f"--border-nm must be a finite distance >= 0 (nm), got {border_threshold_nm}"
        )
    if roi is not None:
        if len(roi) != 6:
            raise ConfigError(f"--roi must be z0,y0,x0,z1,y1,x1, got {list(roi)}")
        if any(a >= b for a, b in zip(roi[:3], roi[3:], strict=True)) or min(roi[:3]) < 0:
            raise ConfigError(
                f"--roi {list(roi)}: each start must be >= 0 and below its stop "
                "(z0 < z1, y0 < y1, x0 < x1)"
            )
    if out is not None:
        folder = Path(out)
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"--out {out} is a file; give a folder for metrics.json")
        existing = next((p for p in folder.parents if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise ConfigError(f"--out {out}: {existing} is a file, not a folder")


def _payload(report: EvaluationReport) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "task": report.task,
        "roi": report.roi,
        "voxel_size_nm_zyx": report.voxel_size,
        "metrics": {k: (v if math.isfinite(v) else None) for k, v in report.metrics.items()},
    }
    if get_task(_task_name(report.task)).instances:
        payload["worst_splits"] = report.worst_splits
        payload["worst_merges"] = report.worst_merges
    if "preview" in report.files:
        payload["preview"] = Path(report.files["preview"]).name
    return payload
