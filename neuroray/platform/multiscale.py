"""Downsampled levels and object meshes for precomputed layers, made by Igneous.

Neuroglancer shows a large layer fast only from a pyramid of downsampled levels, and shows
objects in 3D only from meshes. Igneous builds both the way the field does: downsampling with
tinybrain (images averaged, segmentations by the mode of each block, 2 x 2 in-plane per level,
z kept for anisotropic EM) and meshing with zmesh (marching cubes per block, simplified,
fragments merged per object by a manifest in Neuroglancer's legacy precomputed mesh format).

Igneous cuts the work into tasks; they run as Ray tasks when Ray is connected, and in this
process otherwise (ingest runs without Ray).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Sequence
from typing import Any

from neuroray.errors import VolumeError
from neuroray.platform.volume import open_volume

#: Stop adding levels once the in-plane extent is below this many voxels.
MIN_LEVEL_EXTENT = 64


def _cloudpath(url: str) -> str:
    from neuroray.platform.formats.precomputed import PrecomputedVolume

    volume = open_volume(url)
    if volume.format_name != "precomputed":
        raise VolumeError(f"{url}: downsampled levels and meshes are made for precomputed layers")
    return PrecomputedVolume.cloudpath(url)


def levels_for(shape_zyx: Sequence[int]) -> int:
    """How many 2 x 2 in-plane levels until the smaller in-plane side gets below
    :data:`MIN_LEVEL_EXTENT` (at least 1)."""
    side, levels = min(shape_zyx[1:]), 0
    while side // 2 >= MIN_LEVEL_EXTENT:
        side //= 2
        levels += 1
    return max(levels, 1)


def run_tasks(tasks: Iterable[Any]) -> int:
    """Execute Igneous tasks: as Ray tasks when Ray is connected, else here; returns the count."""
    with contextlib.redirect_stdout(io.StringIO()):  # Igneous prints its task bounds
        tasks = list(tasks)
    import ray

    if ray.is_initialized():
        remote = ray.remote(_execute).options(num_cpus=1, max_retries=1)
        ray.get([remote.remote(task) for task in tasks])
    else:
        for task in tasks:
            _execute(task)
    return len(tasks)


def _execute(task: Any) -> None:
    if hasattr(task, "execute"):  # a RegisteredTask
        task.execute()
    else:  # a queueable function bound with functools.partial
        task()


def add_levels(url: str, levels: int | None = None) -> int:
    """Add up to ``levels`` downsampled levels to the precomputed layer at ``url`` (images are
    averaged, segmentations take each block's mode); returns how many it has now. Levels keep
    the layer's chunk shape, so a layer smaller than two chunks in-plane gets none."""
    from igneous.task_creation import create_downsampling_tasks

    cloudpath = _cloudpath(url)
    levels = levels or levels_for(open_volume(url).shape)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the bounds it covers
        tasks = create_downsampling_tasks(
            cloudpath,
            mip=0,
            axis="z",  # 2 x 2 x 1: z is usually the coarse axis already
            num_mips=levels,
            compress="gzip",
            fill_missing=True,
            delete_black_uploads=False,
        )
    run_tasks(tasks)
    return _scale_count(cloudpath) - 1  # Igneous adds fewer when chunks allow no more


def _scale_count(cloudpath: str) -> int:
    from cloudfiles import CloudFiles

    return len(CloudFiles(cloudpath).get_json("info")["scales"])


def add_meshes(
    url: str,
    *,
    block_shape_zyx: Sequence[int] = (64, 256, 256),
    dust_threshold: int = 100,
    max_simplification_error: float = 40.0,
) -> int:
    """Mesh every object of the segmentation layer at ``url`` with at least ``dust_threshold``
    voxels in the whole layer (zmesh, through Igneous); returns the number of meshing tasks.

    The threshold is global (Igneous counts each object's voxels first), so an object cut by
    block faces is meshed when all its pieces together pass it."""
    from igneous.task_creation import (
        accumulate_voxel_counts,
        create_mesh_manifest_tasks,
        create_meshing_tasks,
        create_voxel_counting_tasks,
    )

    volume = open_volume(url)
    if volume.layer_type != "segmentation":
        raise VolumeError(
            f"{url}: meshes are made for segmentation layers, not {volume.layer_type}"
        )
    cloudpath = _cloudpath(url)
    run_tasks(create_voxel_counting_tasks(cloudpath, mip=0, fill_missing=True))
    with contextlib.redirect_stdout(io.StringIO()):
        accumulate_voxel_counts(cloudpath, mip=0, progress=False)
    tasks = create_meshing_tasks(
        cloudpath,
        mip=0,
        shape=tuple(int(s) for s in block_shape_zyx[::-1]),  # Igneous counts x, y, z
        dust_threshold=dust_threshold,
        dust_global=True,
        max_simplification_error=max_simplification_error,
        fill_missing=True,
    )
    count = run_tasks(tasks)
    run_tasks(create_mesh_manifest_tasks(cloudpath))
    return count
