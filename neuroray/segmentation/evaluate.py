"""``neuroray evaluate``: score a segmentation layer against ground truth, with a PNG preview."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neuroray.errors import ConfigError, NeurorayError
from neuroray.platform.box import Box
from neuroray.platform.volume import open_volume
from neuroray.preview import grid, overlay, save_png
from neuroray.segmentation.tasks import get_task

BINARY_ALIAS = "binary"
"""``--task binary``: score any foreground mask (the metrics of the mito and lm tasks)."""


@dataclass
class EvaluationReport:
    task: str
    metrics: dict[str, float]
    roi: list[int]
    files: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        rows = [f"{'metric':<14} {'value':>10}"]
        rows += [f"{k:<14} {v:>10.4f}" for k, v in self.metrics.items()]
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
) -> EvaluationReport:
    """Read both layers (within ``roi``), score them, and write metrics.json + preview.png.

    Every argument is checked before any voxel is read or any file written.
    """
    get_task(_task_name(task))  # an unknown task fails before any voxel is read
    _check_arguments(roi, out, border_threshold_nm)
    seg_volume, gt_volume = open_volume(segmentation_url), open_volume(labels_url)
    if seg_volume.shape != gt_volume.shape:
        raise NeurorayError(
            f"segmentation {seg_volume.shape} and labels {gt_volume.shape} differ in shape; "
            "evaluate aligned layers (use --roi on the common region)"
        )
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
    seg, gt = seg_volume.read(box), gt_volume.read(box)
    metrics = evaluate_arrays(
        seg, gt, task, voxel_size=gt_volume.voxel_size, border_threshold_nm=border_threshold_nm
    )
    report = EvaluationReport(task=task, metrics=metrics, roi=box.to_list())
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps(_payload(report), indent=2))
        report.files["metrics"] = str(folder / "metrics.json")
        if image_volume is not None:
            raw = image_volume.read(box)
            z = raw.shape[0] // 2
            png = save_png(
                grid([overlay(raw[z], gt[z]), overlay(raw[z], seg[z])]), folder / "preview.png"
            )
            report.files["preview"] = str(png)
    return report


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
    return {"task": report.task, "roi": report.roi, "metrics": report.metrics}
