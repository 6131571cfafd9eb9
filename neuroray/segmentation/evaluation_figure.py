"""``evaluate``'s PNG: image, ground truth, prediction and errors on three orthogonal views.

Rows are the xy, xz and yz planes through the centre of the evaluated box, drawn at their
physical aspect (anisotropic voxels are not squashed). Columns, each titled: the image (when one
is given), the ground truth, the prediction coloured by the object each segment matches (see
:mod:`neuroray.segmentation.split_merge`; segment borders drawn so splits show), and the error
map: split voxels orange, merge voxels blue (instance tasks), or missed and extra foreground
(mask tasks).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from neuroray.preview import label_colours, to_grey
from neuroray.segmentation.split_merge import SplitMerge

SPLIT_RGB = (255, 140, 0)
MERGE_RGB = (30, 110, 255)
BOTH_RGB = (230, 0, 230)
MISSED_RGB = (255, 140, 0)
EXTRA_RGB = (30, 110, 255)
MASK_RGB = (0, 200, 90)  # foreground of mask tasks, the same in ground truth and prediction


def views(shape: Sequence[int]) -> list[tuple[str, tuple]]:
    """(title, index) of the xy, xz and yz planes through the centre of a z, y, x box."""
    z, y, x = (s // 2 for s in shape)
    return [
        (f"xy (z={z})", (z, slice(None), slice(None))),
        (f"xz (y={y})", (slice(None), y, slice(None))),
        (f"yz (x={x})", (slice(None), slice(None), x)),
    ]


def _aspects(voxel_size: Sequence[float]) -> list[float]:
    """Row over column pixel size of each view (matplotlib's ``aspect``)."""
    vz, vy, vx = (float(v) for v in voxel_size)
    return [vy / vx, vz / vx, vz / vy]


def _tint(grey: np.ndarray | None, rgb: np.ndarray, painted: np.ndarray, alpha=0.55):
    base = np.zeros_like(rgb, dtype=np.float32) if grey is None else grey[..., None] * np.ones(3)
    out = base.astype(np.float32)
    out[painted] = (1 - alpha) * out[painted] + alpha * rgb[painted]
    return out.astype(np.uint8)


def _borders(labels: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour has another id (one-pixel segment outlines)."""
    edge = np.zeros(labels.shape, bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


def instance_errors(segmentation: np.ndarray, gt: np.ndarray, analysis: SplitMerge) -> np.ndarray:
    """RGB error colours of a 2D (or any) plane: split, merge, both; black elsewhere."""
    split = analysis.split_mask(segmentation, gt)
    merge = analysis.merge_mask(segmentation, gt)
    rgb = np.zeros((*segmentation.shape, 3), np.uint8)
    rgb[split] = SPLIT_RGB
    rgb[merge] = MERGE_RGB
    rgb[split & merge] = BOTH_RGB
    return rgb


def mask_errors(prediction: np.ndarray, truth: np.ndarray) -> np.ndarray:
    rgb = np.zeros((*prediction.shape, 3), np.uint8)
    rgb[(truth != 0) & (prediction == 0)] = MISSED_RGB
    rgb[(truth == 0) & (prediction != 0)] = EXTRA_RGB
    return rgb


def write_figure(
    path: str | Path,
    segmentation: np.ndarray,
    gt: np.ndarray,
    *,
    image: np.ndarray | None = None,
    analysis: SplitMerge | None = None,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    title: str = "",
) -> Path:
    """Draw the figure for 3D arrays (z, y, x) of the evaluated box; ``analysis`` (instance
    tasks) colours the prediction by matched object and marks splits and merges, without it the
    error map shows missed and extra foreground."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    columns = (["image"] if image is not None else []) + [
        "ground truth",
        "prediction (coloured by matched object)" if analysis else "prediction",
        "errors",
    ]
    planes = views(segmentation.shape)
    figure = Figure(figsize=(3.4 * len(columns), 3.2 * len(planes)), layout="constrained")
    axes = figure.subplots(len(planes), len(columns), squeeze=False)
    for row, ((name, index), aspect) in enumerate(zip(planes, _aspects(voxel_size), strict=True)):
        seg, truth = segmentation[index], gt[index]
        grey = to_grey(image[index]) if image is not None else None
        panels = [] if grey is None else [np.repeat(grey[..., None], 3, axis=-1)]
        if analysis is not None:
            panels.append(_tint(grey, label_colours(truth), truth != 0))
            predicted = _tint(grey, analysis.prediction_colours(seg), seg != 0)
            predicted[_borders(seg) & (seg != 0)] = 0
            errors = instance_errors(seg, truth, analysis)
        else:
            mask_rgb = np.broadcast_to(np.asarray(MASK_RGB, np.uint8), (*seg.shape, 3))
            panels.append(_tint(grey, mask_rgb, truth != 0))
            predicted = _tint(grey, mask_rgb, seg != 0)
            errors = mask_errors(seg, truth)
        panels.append(predicted)
        panels.append(_tint(grey, errors, errors.any(axis=-1), alpha=0.8))
        for col, panel in enumerate(panels):
            ax = axes[row][col]
            ax.imshow(panel, aspect=aspect, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], fontsize="medium")
            if col == 0:
                ax.set_ylabel(name)
    if analysis is not None:
        legend = [(SPLIT_RGB, "split"), (MERGE_RGB, "merge"), (BOTH_RGB, "split + merge")]
    else:
        legend = [(MISSED_RGB, "missed (false negative)"), (EXTRA_RGB, "extra (false positive)")]
    figure.legend(
        handles=[Patch(color=np.asarray(c) / 255, label=label) for c, label in legend],
        loc="outside lower right",
        ncols=len(legend),
        fontsize="small",
        title="errors",
    )
    if title:
        figure.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
