"""OME-Zarr: every zarr neuroray writes is an OME-NGFF image that the ome-zarr package reads with
the right scale; neuroray reads OME-Zarr voxel sizes written by others and its own older arrays."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from neuroray.errors import VolumeError
from neuroray.platform.ingest import ingest
from neuroray.platform.volume import create_volume, open_volume

ome_zarr_io = pytest.importorskip("ome_zarr.io", reason="ome-zarr is a dev dependency")
from ome_zarr.reader import Reader  # noqa: E402


def _ome_read(path):
    """What ome-zarr sees at ``path``: (its full-resolution array, scale, axis names)."""
    image = next(iter(Reader(ome_zarr_io.parse_url(str(path)))()))
    scale = image.metadata["coordinateTransformations"][0][0]["scale"]
    axes = [axis["name"] for axis in image.metadata["axes"]]
    return np.asarray(image.data[0]), scale, axes


@pytest.mark.parametrize(
    "zarr_format,version,channels", [(3, "0.5", 1), (3, "0.5", 2), (2, "0.4", 1)]
)
def test_created_zarr_is_ome_ngff_with_the_voxel_size(tmp_path, zarr_format, version, channels):
    path = tmp_path / "layer.zarr"
    shape = (channels, 6, 10, 12) if channels > 1 else (6, 10, 12)
    data = np.random.default_rng(0).integers(0, 200, size=shape, dtype=np.uint8)
    volume = create_volume(
        path,
        shape=data.shape[-3:],
        dtype="uint8",
        chunk_shape=(3, 5, 6),
        voxel_size=(40, 8, 4),
        num_channels=channels,
        zarr_format=zarr_format,
    )
    volume.write(volume.bounds, data)
    array, scale, axes = _ome_read(path)
    np.testing.assert_array_equal(array, data)
    assert scale == ([1.0] if channels > 1 else []) + [40.0, 8.0, 4.0]
    assert axes == (["c"] if channels > 1 else []) + ["z", "y", "x"]
    group = zarr.open_group(str(path), mode="r")
    attrs = dict(group.attrs)
    found = attrs["ome"]["version"] if zarr_format == 3 else attrs["multiscales"][0]["version"]
    assert found == version
    reread = open_volume(path)
    assert reread.voxel_size == (40.0, 8.0, 4.0)
    np.testing.assert_array_equal(reread[:], data)


def test_ingested_zarr_segmentation_reads_back_in_ome_zarr(tmp_path):
    labels = np.zeros((8, 16, 16), dtype=np.uint32)
    labels[2:6, 4:12, 4:12] = 7
    np.save(tmp_path / "labels.npy", labels)
    source = open_volume(tmp_path / "labels.npy", voxel_size=(30, 6, 6))
    ingest(source, str(tmp_path / "labels.zarr"), chunk_shape=(4, 8, 8), progress=False)
    array, scale, _ = _ome_read(tmp_path / "labels.zarr")
    np.testing.assert_array_equal(array, labels)
    assert scale == [30.0, 6.0, 6.0]
    layer = open_volume(tmp_path / "labels.zarr")
    assert layer.layer_type == "segmentation"
    assert layer.voxel_size == (30.0, 6.0, 6.0)


def test_reads_ome_zarr_written_by_others_in_micrometres(tmp_path):
    root = zarr.open_group(str(tmp_path / "other.zarr"), mode="w", zarr_format=3)
    data = np.arange(4 * 5 * 6, dtype=np.uint16).reshape(4, 5, 6)
    root.create_array("s0", data=data, chunks=(2, 5, 6))
    root.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "axes": [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"],
                "datasets": [
                    {
                        "path": "s0",
                        "coordinateTransformations": [{"type": "scale", "scale": [0.5, 0.1, 0.1]}],
                    }
                ],
            }
        ],
    }
    volume = open_volume(tmp_path / "other.zarr")
    assert volume.voxel_size == pytest.approx((500.0, 100.0, 100.0))
    np.testing.assert_array_equal(volume[:], data)


def test_old_plain_arrays_keep_their_voxel_size_attribute(tmp_path):
    old = zarr.create_array(store=str(tmp_path / "old.zarr"), shape=(4, 4, 4), dtype="uint8")
    old.attrs.update({"voxel_size": [40.0, 4.0, 4.0], "layer_type": "image"})
    assert open_volume(tmp_path / "old.zarr").voxel_size == (40.0, 4.0, 4.0)


def test_group_without_multiscales_is_a_clear_error(tmp_path):
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(VolumeError, match="without OME-Zarr 'multiscales'"):
        open_volume(tmp_path / "plain.zarr")
