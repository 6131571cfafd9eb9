"""LM data path: TIFF + SWC -> aligned image / label layers with the stack's anisotropy, served
(DIADEM OP_1 where ../shared/data is, a synthetic stack and tracing otherwise)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from neuroray.errors import VolumeError
from neuroray.platform.box import Box
from neuroray.platform.ingest import read_manifest
from neuroray.platform.lm_data import (
    label_mask,
    op_pairs,
    prepare_lm_stack,
    prepare_lm_stacks,
    read_lm_record,
)
from neuroray.platform.swc import read_swc
from neuroray.platform.synthetic import write_synthetic
from neuroray.platform.volume import open_volume


@pytest.fixture(scope="module")
def op1_layers(lm_stack, tmp_path_factory):
    """DIADEM OP_1 (or a synthetic stack and tracing) prepared as image + label layers."""
    tif, swc = lm_stack.tif, lm_stack.swc
    if lm_stack.real:
        assert op_pairs(tif.parent.parent, [1])[0] == (tif, swc)  # what users name OP_1
    dst = tmp_path_factory.mktemp("op1")
    # the small synthetic stack gets small chunks, so some of them hold no neuron, as on OP_1
    chunks = {} if lm_stack.real else {"chunk_shape": (16, 32, 32)}
    return tif, swc, dst, prepare_lm_stack(tif, swc, dst, radius_floor_px=2.0, **chunks)


@pytest.fixture(scope="module")
def op1_real(lm_stack):
    return lm_stack.real


def test_op1_labels_cover_the_swc_and_the_bright_neuron(op1_layers, op1_real):
    tif, swc, _, urls = op1_layers
    image, labels = open_volume(urls["image"]), open_volume(urls["labels"])
    stack = open_volume(tif)
    assert image.shape == labels.shape == stack.shape
    assert image.voxel_size == labels.voxel_size == pytest.approx(stack.voxel_size)
    if op1_real:
        assert image.shape == (60, 512, 512)
        assert image.voxel_size == pytest.approx((998.8, 329.6, 329.6))
    assert labels.layer_type == "segmentation" and image.dtype == np.uint8
    raw = open_volume(tif)[:, :, :]
    img, lab = image[:, :, :], labels[:, :, :]
    np.testing.assert_array_equal(img, raw)  # the image is copied voxel for voxel

    tree = read_swc(swc, allow_zero_radius=True)
    nodes = np.rint(tree.zyx).astype(int)
    inside = np.all((nodes >= 0) & (nodes < lab.shape), axis=1)
    assert inside.mean() > 0.99
    assert lab[tuple(nodes[inside].T)].all()  # every node voxel is labelled
    foreground = lab > 0
    assert 1e-4 < foreground.mean() < 1e-2  # thin: ~0.1% of the stack
    assert img[foreground].mean() > 50 * max(img[~foreground].mean(), 0.1)
    assert set(np.unique(lab)) == {0, 1}


def test_op1_labels_respect_the_anisotropy(op1_layers):
    tif, swc, _, urls = op1_layers
    lab = open_volume(urls["labels"])[:, :, :]
    stack = open_volume(tif)
    isotropic = label_mask(swc, stack.shape, (329.6, 329.6, 329.6), radius_floor_px=2.0)
    # a 2 px (0.66 um) radius is under one 1 um slice: the real anisotropy gives a flatter mask
    assert lab.sum() < isotropic.sum()
    assert np.array_equal(lab > 0, label_mask(swc, stack.shape, stack.voxel_size))


def test_op1_manifest_and_record_say_where_the_neuron_is(op1_layers):
    tif, _, dst, urls = op1_layers
    manifest = read_manifest(urls["labels"])
    fractions = manifest.column("foreground_fraction").to_numpy()
    assert fractions.max() > 0 and (fractions == 0).any()
    record = read_lm_record(dst)
    assert record["radius_floor_px"] == 2.0 and record["stacks"][0]["name"] == Path(tif).stem
    assert record["stacks"][0]["foreground_fraction"] == pytest.approx(
        (open_volume(urls["labels"])[:, :, :] > 0).mean()
    )


@pytest.mark.slow
def test_server_pool_serves_prepared_op1_crops(op1_layers, ray_session):
    from neuroray.platform.server import ServerPool

    tif, swc, _, urls = op1_layers
    nodes = read_swc(swc, allow_zero_radius=True).zyx
    node = np.rint(nodes[min(200, len(nodes) // 2)]).astype(int)
    shape = open_volume(tif).shape
    start = np.clip(node - (8, 32, 32), 0, np.subtract(shape, (16, 64, 64)))
    box = Box(tuple(start), tuple(start + (16, 64, 64)))
    pool = ServerPool(urls, num_servers=1, cache_mb=16)
    try:
        crops = pool.get_crops([box])
    finally:
        pool.shutdown()
    assert crops["labels"][0].any()
    np.testing.assert_array_equal(crops["image"][0], open_volume(tif)[box.slices])


def synthetic_stack(directory, name: str, shape, seed: int, spacing_um=None):
    """A synthetic LM stack + SWC written like the DIADEM files, renamed to ``name``."""
    urls = write_synthetic("lm", directory, shape=shape, seed=seed)
    tif, swc = directory / f"{name}.tif", directory / f"{name}.swc"
    image = tifffile.imread(urls["image"])
    if spacing_um is None:
        with tifffile.TiffFile(urls["image"]) as f:
            spacing_um = json.loads(f.pages[0].description)["spacing_um_zyx"]
    tifffile.imwrite(tif, image, metadata={"spacing_um_zyx": list(spacing_um), "axes": "ZYX"})
    swc.write_text(Path(urls["swc"]).read_text())
    return tif, swc


def test_stacks_are_concatenated_along_z_with_gaps(tmp_path):
    pairs = [
        synthetic_stack(tmp_path, "a", (20, 64, 64), 0),
        synthetic_stack(tmp_path, "b", (24, 48, 64), 1),
    ]
    layers = prepare_lm_stacks(pairs, tmp_path / "both", gap_z=8, radius_floor_px=1.5)
    assert list(layers.stacks) == ["a", "b"]
    assert layers.stacks["a"] == Box((0, 0, 0), (20, 64, 64))
    assert layers.stacks["b"] == Box((28, 0, 0), (52, 48, 64))
    assert layers.roi("b") == [28, 0, 0, 52, 48, 64]
    assert layers.layers == {"image": layers.image, "labels": layers.labels}
    image, labels = open_volume(layers.image), open_volume(layers.labels)
    assert image.shape == (52, 64, 64)
    img, lab = image[:, :, :], labels[:, :, :]
    assert not lab[20:28].any() and not img[20:28].any()  # the gap is empty
    assert not lab[28:52, 48:].any()  # b is padded in y
    for (tif, swc), box in zip(pairs, layers.stacks.values(), strict=True):
        stack = open_volume(tif)
        np.testing.assert_array_equal(img[box.slices], stack[:, :, :])
        expected = label_mask(swc, stack.shape, stack.voxel_size, radius_floor_px=1.5)
        assert expected.any()
        np.testing.assert_array_equal(lab[box.slices] > 0, expected)


def test_bad_inputs_raise_volume_errors(tmp_path):
    tif, swc = synthetic_stack(tmp_path, "a", (8, 32, 32), 0)
    bare = tmp_path / "bare.tif"
    tifffile.imwrite(bare, np.zeros((8, 32, 32), np.uint8))
    with pytest.raises(VolumeError, match="voxel size"):
        prepare_lm_stack(bare, swc, tmp_path / "out")
    urls = prepare_lm_stack(bare, swc, tmp_path / "ok", voxel_size=(1000, 330, 330))
    assert open_volume(urls["labels"]).voxel_size == (1000, 330, 330)
    other = synthetic_stack(tmp_path, "b", (8, 32, 32), 1, spacing_um=(2.0, 0.33, 0.33))
    with pytest.raises(VolumeError, match="different voxel sizes"):
        prepare_lm_stacks([(tif, swc), other], tmp_path / "mixed")
    with pytest.raises(VolumeError, match="repeat"):
        prepare_lm_stacks([(tif, swc), (tif, swc)], tmp_path / "twice")
    with pytest.raises(VolumeError, match="missing OP files"):
        op_pairs(tmp_path, [1])
