"""open_volume / create_volume: every format reads in z, y, x with the right metadata."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import tifffile
import zarr

from neuroray.errors import VolumeError
from neuroray.platform.box import Box, chunk_grid, chunks_touching
from neuroray.platform.volume import VOLUME_FORMATS, create_volume, format_of, open_volume

RNG = np.random.default_rng(0)
CUBE = RNG.integers(0, 255, size=(12, 20, 28), dtype=np.uint8)  # z, y, x all different


def _write_every_format(tmp_path):
    """The same cube in every format, so each reader can be checked against numpy."""
    urls = {}
    np.save(tmp_path / "cube.npy", CUBE)
    urls["npy"] = str(tmp_path / "cube.npy")
    with h5py.File(tmp_path / "cube.h5", "w") as f:
        f.create_dataset("group/raw", data=CUBE, chunks=(4, 10, 14))
        f.attrs["resolution_nm_zyx"] = [40.0, 4.0, 4.0]
    urls["hdf5"] = str(tmp_path / "cube.h5") + "#group/raw"
    tifffile.imwrite(tmp_path / "cube.tif", CUBE, metadata={"spacing_um_zyx": [1.0, 0.33, 0.33]})
    urls["tiff"] = str(tmp_path / "cube.tif")
    z2 = zarr.create_array(
        store=str(tmp_path / "v2.zarr"),
        shape=CUBE.shape,
        chunks=(4, 8, 8),
        dtype="uint8",
        zarr_format=2,
    )
    z2[:] = CUBE
    urls["zarr"] = str(tmp_path / "v2.zarr")
    pc = create_volume(
        f"precomputed://file://{tmp_path}/pc",
        shape=CUBE.shape,
        dtype="uint8",
        chunk_shape=(4, 8, 8),
        voxel_size=(40, 4, 4),
    )
    for box in chunk_grid(pc.bounds, pc.chunk_shape):
        pc.write(box, CUBE[box.slices])
    urls["precomputed"] = f"precomputed://file://{tmp_path}/pc"
    return urls


def test_every_registered_format_reads_zyx(tmp_path):
    urls = _write_every_format(tmp_path)
    assert set(urls) == set(VOLUME_FORMATS.names())
    for name, url in urls.items():
        volume = open_volume(url)
        assert format_of(url) == name
        assert volume.shape == CUBE.shape, name
        assert volume.dtype == np.uint8
        np.testing.assert_array_equal(volume[:], CUBE, err_msg=name)
        np.testing.assert_array_equal(volume[2:7, 3:19, 5:27], CUBE[2:7, 3:19, 5:27], err_msg=name)
        np.testing.assert_array_equal(volume[5, :, 3], CUBE[5, :, 3], err_msg=name)
        np.testing.assert_array_equal(volume[..., -1], CUBE[..., -1], err_msg=name)


def test_voxel_sizes_are_zyx_in_nm(tmp_path):
    urls = _write_every_format(tmp_path)
    assert open_volume(urls["hdf5"]).voxel_size == (40.0, 4.0, 4.0)
    assert open_volume(urls["precomputed"]).voxel_size == (40.0, 4.0, 4.0)
    assert open_volume(urls["tiff"]).voxel_size == pytest.approx((1000.0, 330.0, 330.0))
    assert open_volume(urls["npy"], voxel_size=(8, 8, 8)).voxel_size == (8.0, 8.0, 8.0)


def test_precomputed_converts_from_xyz(tmp_path):
    """CloudVolume stores x, y, z: the info file must list sizes reversed from ours."""
    import json

    volume = create_volume(
        tmp_path / "layer",
        shape=(5, 6, 7),
        dtype="uint32",
        chunk_shape=(5, 3, 7),
        voxel_size=(30, 2, 1),
        format="precomputed",
    )
    volume.write(volume.bounds, np.arange(5 * 6 * 7, dtype=np.uint32).reshape(5, 6, 7))
    info = json.loads((tmp_path / "layer" / "info").read_text())
    scale = info["scales"][0]
    assert scale["size"] == [7, 6, 5]
    assert scale["resolution"] == [1, 2, 30]
    assert scale["chunk_sizes"] == [[7, 3, 5]]
    assert info["type"] == "segmentation"
    assert scale["encoding"] == "compressed_segmentation"
    reread = open_volume(tmp_path / "layer")
    assert reread[4, 5, 6] == 5 * 6 * 7 - 1
    assert reread[0, 0, 1] == 1  # x is the fastest axis in our arrays too


@pytest.mark.parametrize("fmt,url", [("zarr", "multi.zarr"), ("precomputed", "multi_pc")])
def test_multichannel_layers_are_channels_first(tmp_path, fmt, url):
    data = RNG.random((3, 8, 16, 16)).astype(np.float32)
    volume = create_volume(
        tmp_path / url,
        shape=(8, 16, 16),
        dtype="float32",
        chunk_shape=(8, 16, 16),
        num_channels=3,
        format=fmt,
    )
    volume.write(volume.bounds, data)
    reread = open_volume(tmp_path / url)
    assert reread.num_channels == 3
    np.testing.assert_array_equal(reread[:], data)
    np.testing.assert_array_equal(reread[2:5, 1:9, :], data[:, 2:5, 1:9, :])


def test_volumes_pickle_by_url(tmp_path):
    import pickle

    urls = _write_every_format(tmp_path)
    for url in urls.values():
        clone = pickle.loads(pickle.dumps(open_volume(url)))
        np.testing.assert_array_equal(clone[:], CUBE)


def test_missing_file_and_missing_key(tmp_path, em_volume):
    with pytest.raises(VolumeError, match="does not exist"):
        open_volume(tmp_path / "absent.h5#raw")
    h5 = em_volume.raw.split("#")[0]  # fib_gala_train, or its synthetic stand-in with mito too
    datasets = "labels, raw" if em_volume.real else "labels, mito, raw"
    with pytest.raises(VolumeError, match=rf"no dataset 'rawz'.*datasets: {datasets}"):
        open_volume(h5 + "#rawz")
    with pytest.raises(VolumeError, match="name the dataset after '#'"):
        open_volume(h5)
    with pytest.raises(VolumeError, match="info' file is missing"):
        open_volume(f"precomputed://file://{tmp_path}")
    with pytest.raises(VolumeError, match="does not exist"):
        open_volume(tmp_path / "absent.zarr")
    with pytest.raises(VolumeError, match="cannot tell the format"):
        open_volume(tmp_path)


def test_unsupported_dtype_and_shape(tmp_path):
    array = zarr.create_array(store=str(tmp_path / "c.zarr"), shape=(4, 4, 4), dtype="complex64")
    array[:] = 1
    with pytest.raises(VolumeError, match="complex64 is not supported"):
        open_volume(tmp_path / "c.zarr")
    np.save(tmp_path / "flat.npy", np.zeros((4, 4), np.uint8))
    with pytest.raises(VolumeError, match="3D"):
        open_volume(tmp_path / "flat.npy")


def test_reads_outside_bounds_and_readonly_writes_fail(tmp_path):
    np.save(tmp_path / "a.npy", CUBE)
    volume = open_volume(tmp_path / "a.npy")
    with pytest.raises(VolumeError, match="outside"):
        volume.read(Box((0, 0, 0), (13, 1, 1)))
    with pytest.raises(VolumeError, match="read-only"):
        volume[0:1, 0:1, 0:1] = 3
    with pytest.raises(VolumeError, match="already exists"):
        create_volume(tmp_path / "a.npy", shape=(2, 2, 2), dtype="uint8")


def test_corrupt_precomputed_chunk_is_a_clear_error(tmp_path):
    volume = create_volume(
        tmp_path / "pc",
        shape=(8, 8, 8),
        dtype="uint8",
        chunk_shape=(4, 8, 8),
        format="precomputed",
    )
    volume.write(volume.bounds, np.full((8, 8, 8), 7, np.uint8))
    chunk = next(p for p in (tmp_path / "pc").rglob("*") if p.is_file() and "0-8_0-8_4-8" in p.name)
    chunk.write_bytes(chunk.read_bytes()[:10])  # truncated bytes
    reread = open_volume(tmp_path / "pc")
    np.testing.assert_array_equal(reread[0:4], 7)  # the intact chunk still reads
    with pytest.raises(VolumeError, match=r"cannot read.*corrupt"):
        reread[4:8]


def test_chunk_grid_tiles_bounds_and_touching_chunks():
    bounds = Box((0, 0, 0), (10, 17, 5))
    boxes = list(chunk_grid(bounds, (4, 8, 5)))
    covered = np.zeros(bounds.shape, int)
    for box in boxes:
        covered[box.slices] += 1
    assert (covered == 1).all()
    crop = Box((3, 7, 0), (5, 9, 5))
    touching = list(chunks_touching(crop, (4, 8, 5), bounds))
    assert len(touching) == 4
    assert all(not b.intersect(crop).empty for b in touching)


def test_empty_shapes_unknown_schemes_and_read_only_web_servers_are_refused(tmp_path):
    from neuroray.platform.remote import url_scheme
    from neuroray.platform.volume import check_destination

    assert url_scheme("zarr://s3://b/x.zarr") == "s3"
    assert url_scheme("precomputed://gs://b/x") == "gs"
    assert url_scheme("/data/x") is None and url_scheme("file:///data/x") == "file"
    for shape, chunks in (((4, 0, 4), (4, 4, 4)), ((4, 4, 4), (4, 0, 4))):
        with pytest.raises(VolumeError, match="empty|positive"):
            create_volume(tmp_path / "v", shape=shape, dtype="uint8", chunk_shape=chunks)
        assert not (tmp_path / "v").exists()
    with pytest.raises(VolumeError, match="read-only"):
        check_destination("https://127.0.0.1:9/layer")  # refused before any request
    with pytest.raises(VolumeError, match="unsupported URL scheme s3a://"):
        check_destination("zarr://s3a://bucket/x.zarr")
    with pytest.raises(VolumeError, match="unsupported URL scheme S3://"):
        open_volume("S3://bucket/raw")  # schemes are lower case; not a local folder "S3:"
    zero = zarr.create_array(store=str(tmp_path / "z.zarr"), shape=(0, 4, 4), dtype="uint8")
    assert zero.shape == (0, 4, 4)
    with pytest.raises(VolumeError, match="empty"):
        open_volume(tmp_path / "z.zarr")
