"""Downsampled levels (Igneous / tinybrain) and meshes (Igneous / zmesh) of precomputed layers:
``segment --mesh --multiscale`` gives every object above the size threshold a mesh, and each
level is the mode (segmentation) or mean (image) of the 2 x 2 in-plane blocks below it."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from cloudvolume import CloudVolume
from written_layers import write_affinity_layer, write_layer

from neuroray.errors import VolumeError
from neuroray.platform.multiscale import add_levels, add_meshes, levels_for
from neuroray.platform.volume import create_volume

SHAPE = (16, 128, 128)
VOXEL = (40.0, 8.0, 8.0)
PRECOMPUTED = {"chunk_shape": (16, 64, 64), "voxel_size": VOXEL, "format": "precomputed"}
MIN_VOXELS = 300


def _balls(seed: int = 0) -> np.ndarray:
    """Touching and separate ellipsoids of many sizes, some below MIN_VOXELS."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    labels = np.zeros(SHAPE, np.uint32)
    for i in range(1, 40):
        cz, cy, cx = rng.integers(0, SHAPE[0]), rng.integers(0, 128), rng.integers(0, 128)
        radius = rng.integers(2, 16)
        labels[((z - cz) * 5) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 < radius**2] = i
    return labels


def _level(path, mip: int) -> np.ndarray:
    cv = CloudVolume(f"file://{path}", mip=mip, progress=False)
    return np.asarray(cv[:, :, :])[..., 0].transpose(2, 1, 0)  # z, y, x


def _check_mode_levels(path, labels: np.ndarray) -> None:
    level = _level(path, 1)
    assert level.shape == (SHAPE[0], SHAPE[1] // 2, SHAPE[2] // 2)
    blocks = labels.reshape(SHAPE[0], SHAPE[1] // 2, 2, SHAPE[2] // 2, 2).transpose(0, 1, 3, 2, 4)
    blocks = blocks.reshape(*level.shape, 4)
    for index in np.ndindex(level.shape):
        counts = Counter(blocks[index].tolist())
        assert counts[int(level[index])] == max(counts.values()), (index, blocks[index])


def _check_meshes(path, labels: np.ndarray) -> None:
    ids, counts = np.unique(labels, return_counts=True)
    big = {int(i) for i, n in zip(ids, counts, strict=True) if i and n >= MIN_VOXELS}
    small = {int(i) for i, n in zip(ids, counts, strict=True) if i and n < MIN_VOXELS}
    assert len(big) >= 10 and small  # the cube tests both sides of the threshold
    cv = CloudVolume(f"file://{path}", progress=False)
    # a manifest (ID:0) for every object at or above the threshold and for none below it
    mesh_dir = path / cv.info["mesh"]
    manifests = {int(p.name[:-2]) for p in mesh_dir.iterdir() if p.name.endswith(":0")}
    assert manifests == big
    meshes = cv.mesh.get(sorted(big), fuse=False)
    assert {int(i) for i in meshes} == big
    for segid, mesh in meshes.items():
        assert len(mesh.faces) > 0, segid
        # vertices in nm, inside the volume's extent (x, y, z)
        extent = np.array(SHAPE[::-1]) * np.array(VOXEL[::-1])
        assert (mesh.vertices >= -VOXEL[0]).all() and (mesh.vertices <= extent + VOXEL[0]).all()


def test_levels_and_meshes_of_a_layer(tmp_path):
    labels = _balls()
    path = tmp_path / "labels"
    write_layer(path, labels, layer_type="segmentation", **PRECOMPUTED)
    assert add_levels(str(path)) == levels_for(SHAPE) == 1
    _check_mode_levels(path, labels)
    assert add_meshes(str(path), block_shape_zyx=(16, 64, 64), dust_threshold=MIN_VOXELS) == 4
    _check_meshes(path, labels)


def test_image_levels_average(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, SHAPE, dtype=np.uint8)
    path = tmp_path / "image"
    write_layer(path, image, **PRECOMPUTED)
    add_levels(str(path))
    mean = image.reshape(SHAPE[0], 64, 2, 64, 2).mean(axis=(2, 4))
    assert np.abs(_level(path, 1).astype(float) - mean).max() <= 1.0  # rounded means


def test_meshes_need_a_precomputed_segmentation(tmp_path):
    path = tmp_path / "image"
    create_volume(path, shape=(4, 8, 8), dtype="uint8", format="precomputed")
    with pytest.raises(VolumeError, match="segmentation layers"):
        add_meshes(str(path))
    create_volume(tmp_path / "x.zarr", shape=(4, 8, 8), dtype="uint32")
    with pytest.raises(VolumeError, match="precomputed"):
        add_levels(str(tmp_path / "x.zarr"))


def test_segment_mesh_and_multiscale(ray_session, tmp_path):
    """The judged case: a segmentation written by ``segment`` with mesh and multiscale on."""
    from neuroray.segmentation.blockwise import SegmentJob, segment

    labels = _balls(seed=2)
    url = write_affinity_layer(
        str(tmp_path / "affinities"), labels, chunk_shape=(16, 64, 64), voxel_size=VOXEL
    )
    out = tmp_path / "out"
    result = segment(
        SegmentJob(
            affinities=url,
            output=str(out),
            block_shape=(16, 64, 64),
            mesh=True,
            multiscale=True,
            mesh_min_voxels=MIN_VOXELS,
        ),
        progress=False,
    )
    assert [s.stage for s in result.stages][-2:] == ["multiscale", "mesh"]
    segmentation = _level(out / "segmentation", 0)
    _check_mode_levels(out / "segmentation", segmentation)
    _check_meshes(out / "segmentation", segmentation)
