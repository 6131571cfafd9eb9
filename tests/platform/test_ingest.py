"""Ingest: EM files (real, or synthetic without ../shared) round-trip bit-identically; manifests
are right; reruns resume."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from neuroray.errors import VolumeError
from neuroray.platform.ingest import ingest, manifest_boxes, read_manifest
from neuroray.platform.volume import open_volume


def _em_datasets(paths):
    found = []
    for path in paths:
        with h5py.File(path) as f:
            f.visititems(
                lambda name, obj, p=path: (
                    found.append(f"{p}#{name}") if isinstance(obj, h5py.Dataset) else None
                )
            )
    return found


@pytest.mark.parametrize("suffix", ["", ".zarr"], ids=["precomputed", "zarr3"])
def test_every_em_dataset_round_trips(em_volume, tmp_path, suffix):
    folder = Path(em_volume.raw.split("#")[0]).parent
    urls = _em_datasets(sorted(folder.glob("*.h5")))
    if em_volume.real:
        assert len(urls) >= 12  # every dataset of the 5 EM files
    else:
        assert len(urls) >= 3  # raw, labels, mito of each synthetic file
    for i, url in enumerate(urls):
        source = h5py.File(url.split("#")[0])[url.split("#")[1]][()]
        labels = source.dtype == np.uint32
        dst = str(tmp_path / f"layer{i}{suffix}")
        result = ingest(url, dst, chunk_shape=(32, 128, 128), labels=labels, progress=False)
        assert result.chunks_skipped == 0
        layer = open_volume(dst)
        assert layer.layer_type == ("segmentation" if labels else "image")
        assert layer.format_name == ("zarr" if suffix else "precomputed")
        assert layer.voxel_size == open_volume(url).voxel_size
        assert layer.dtype == source.dtype, url
        np.testing.assert_array_equal(layer[:], source, err_msg=url)


def test_manifest_matches_numpy(em_volume, tmp_path):
    url = em_volume.labels
    labels = open_volume(url)[:]
    ingest(url, str(tmp_path / "labels"), chunk_shape=(16, 32, 64), progress=False)
    table = read_manifest(str(tmp_path / "labels"))
    boxes = manifest_boxes(table)
    assert len(boxes) == 4 * 4 * 4
    for box, fg, n_ids in zip(
        boxes,
        table.column("foreground_fraction").to_pylist(),
        table.column("n_ids").to_pylist(),
        strict=True,
    ):
        chunk = labels[box.slices]
        assert fg == pytest.approx(np.count_nonzero(chunk) / chunk.size)
        assert n_ids == len(set(np.unique(chunk)) - {0})
    raw_url = em_volume.raw
    raw = open_volume(raw_url)[:]
    ingest(raw_url, str(tmp_path / "raw.zarr"), chunk_shape=(16, 32, 64), progress=False)
    table = read_manifest(str(tmp_path / "raw.zarr"))
    for box, mean, std in zip(
        manifest_boxes(table),
        table.column("mean").to_pylist(),
        table.column("std").to_pylist(),
        strict=True,
    ):
        assert mean == pytest.approx(raw[box.slices].mean())
        assert std == pytest.approx(raw[box.slices].std())


class Interrupt(Exception):
    pass


def test_interrupted_ingest_resumes_without_rewriting(em_volume, tmp_path):
    url = em_volume.raw
    dst = tmp_path / "raw"
    done = []

    def stop_after_five(box):
        done.append(box)
        if len(done) == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        ingest(url, str(dst), chunk_shape=(25, 50, 100), progress=False, on_chunk=stop_after_five)
    assert not (dst / "manifest.parquet").exists()
    chunk_files = {p: p.stat().st_mtime_ns for p in (dst / "10_10_10").iterdir()}
    assert len(chunk_files) == 5

    result = ingest(url, str(dst), chunk_shape=(25, 50, 100), progress=False)
    assert (result.chunks_written, result.chunks_skipped) == (3, 5)
    for path, mtime in chunk_files.items():
        assert path.stat().st_mtime_ns == mtime, f"{path.name} was rewritten"
    np.testing.assert_array_equal(open_volume(dst)[:], open_volume(url)[:])
    assert len(read_manifest(str(dst))) == 8


def test_a_torn_chunk_without_marker_is_rewritten(em_volume, tmp_path):
    """A chunk cut off mid-write has no (or a torn) marker, so a rerun writes it again."""
    url = em_volume.raw
    dst = tmp_path / "raw"
    ingest(url, str(dst), chunk_shape=(25, 50, 100), progress=False)
    chunk = dst / "10_10_10" / "0-100_0-50_0-25.gz"
    chunk.write_bytes(chunk.read_bytes()[:5])
    (dst / ".neuroray" / "ingest" / "0_0_0_25_50_100.json").write_text("{")
    with pytest.raises(VolumeError, match="corrupt"):
        open_volume(dst)[:]
    result = ingest(url, str(dst), chunk_shape=(25, 50, 100), progress=False)
    assert (result.chunks_written, result.chunks_skipped) == (1, 7)
    np.testing.assert_array_equal(open_volume(dst)[:], open_volume(url)[:])


def test_bad_inputs(tmp_path, em_volume):
    h5 = em_volume.raw.split("#")[0]
    floats = zarr.create_array(store=str(tmp_path / "f.zarr"), shape=(8, 8, 8), dtype="float32")
    floats[:] = 1.5
    with pytest.raises(VolumeError, match="labels must have an integer dtype.*float32"):
        ingest(str(tmp_path / "f.zarr"), str(tmp_path / "out"), labels=True, progress=False)
    with pytest.raises(VolumeError, match="no dataset 'nope'"):
        ingest(f"{h5}#nope", str(tmp_path / "o2"), progress=False)
    with pytest.raises(VolumeError, match="precomputed layers or .zarr"):
        ingest(em_volume.raw, str(tmp_path / "o.h5"), progress=False)
    ingest(em_volume.raw, str(tmp_path / "o3"), progress=False)
    with pytest.raises(VolumeError, match="other inputs or settings.*layer_type.*--overwrite"):
        ingest(em_volume.labels, str(tmp_path / "o3"), progress=False)
    negative = np.full((4, 4, 4), -3, np.int64)
    np.save(tmp_path / "neg.npy", negative)
    with pytest.raises(VolumeError, match="non-negative"):
        ingest(str(tmp_path / "neg.npy"), str(tmp_path / "o4"), labels=True, progress=False)
    assert not (tmp_path / "o4").exists()  # found part-way: the new layer is removed again
