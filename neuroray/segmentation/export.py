"""``neuroray export swc``: an LM segmentation skeletonised into an SWC tree (kimimaro).

The foreground of a segmentation layer (every non-zero voxel; for ``neuroray segment``'s LM
output, the neuron mask) is skeletonised by :func:`~neuroray.segmentation.lm_metrics.skeletonize`
(kimimaro's TEASAR, honouring the voxel size) and written with
:func:`~neuroray.platform.swc.write_swc`. Positions are in voxels of the exported box (x, y
pixels, z slices, radius in x pixels: the DIADEM gold SWC convention that ``evaluate --swc`` and
``data lm`` read), so the file compares directly with a gold reconstruction of the same box.

    >>> tree = export_swc("seg/op/segmentation", "op.swc", roi=(0, 0, 0, 60, 512, 512))
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from neuroray.errors import NeurorayError
from neuroray.paths import local_file
from neuroray.platform.box import Box
from neuroray.platform.swc import SWCTree, write_swc
from neuroray.platform.volume import open_volume


def segmentation_url(target: str) -> str:
    """``target``'s segmentation layer: itself, or the ``segmentation`` of a segment output."""
    from neuroray.view import is_segment_output

    path = local_file(target)
    if path is not None and not path.exists():
        raise NeurorayError(f"nothing to export at {target}: the path does not exist")
    if path is not None and is_segment_output(path):
        return str(path / "segmentation")
    return target


def export_swc(
    segmentation: str,
    swc: str | os.PathLike[str],
    *,
    roi: Sequence[int] | None = None,
    dust_voxels: int = 20,
    scale: float = 1.5,
    const_nm: float = 1000.0,
) -> SWCTree:
    """Skeletonise the foreground of ``segmentation`` (a layer URL or a segment output folder)
    inside ``roi`` (z0, y0, x0, z1, y1, x1; default the whole layer) and write it to ``swc``.

    ``dust_voxels``, ``scale`` and ``const_nm`` are kimimaro's (see
    :func:`~neuroray.segmentation.lm_metrics.skeletonize`). Returns the tree written; an empty
    foreground is refused (an SWC with no node is no reconstruction)."""
    from neuroray.segmentation.lm_metrics import skeletonize

    url = segmentation_url(segmentation)
    volume = open_volume(url)
    if volume.layer_type != "segmentation":
        raise NeurorayError(
            f"{url} is an {volume.layer_type} layer: export swc skeletonises a segmentation "
            "(neuroray segment's output folder or its segmentation layer)"
        )
    if volume.num_channels != 1:
        raise NeurorayError(f"{url} has {volume.num_channels} channels; give a 1-channel layer")
    box = Box(roi[:3], roi[3:]) if roi is not None else volume.bounds
    if not volume.bounds.contains(box):
        raise NeurorayError(f"roi {list(roi)} is outside {url} (shape z,y,x {list(volume.shape)})")
    mask = np.asarray(volume.read(box)) != 0
    if not mask.any():
        raise NeurorayError(f"{url} has no foreground voxel in {box}: nothing to skeletonise")
    tree = skeletonize(
        mask, volume.voxel_size, scale=scale, const_nm=const_nm, dust_voxels=dust_voxels
    )
    if len(tree) == 0:
        raise NeurorayError(
            f"{url}: no object of {dust_voxels} or more voxels in {box}; lower --dust-voxels"
        )
    tree = dataclasses.replace(  # 1/10,000 of a voxel is plenty, and reads better
        tree, xyz=np.round(tree.xyz, 4), radii=np.round(tree.radii, 4)
    )
    z0, y0, x0 = box.start
    comment = (
        f"skeleton of {url} (kimimaro TEASAR: scale {scale}, const {const_nm} nm, dust "
        f"{dust_voxels} voxels)\nvoxel coordinates of the box starting at z,y,x {z0},{y0},{x0}; "
        f"voxel size z,y,x {[round(v, 4) for v in volume.voxel_size]} nm"
    )
    write_swc(tree, Path(swc), comment=comment)
    return tree
