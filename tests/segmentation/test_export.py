"""``neuroray export swc``: an LM segmentation layer skeletonised (kimimaro) into an SWC that
lies on the gold reconstruction it was drawn from (DIADEM OP_1 where the data is)."""

from __future__ import annotations

import numpy as np
import pytest

from neuroray.cli import main
from neuroray.platform.swc import rasterize, read_swc
from neuroray.platform.volume import create_volume, open_volume
from neuroray.segmentation.lm_metrics import tree_distance


@pytest.fixture(scope="module")
def neuron_layer(lm_stack, tmp_path_factory):
    """The gold tracing rasterised into a precomputed segmentation layer (the neuron mask an LM
    segmentation is), with its stack's voxel size; and the gold tree."""
    stack = open_volume(lm_stack.tif)
    gold = read_swc(lm_stack.swc, allow_zero_radius=True)
    mask = rasterize(gold, stack.shape, stack.voxel_size, radius_floor=2.0)
    url = str(tmp_path_factory.mktemp("export") / "neuron")
    layer = create_volume(
        url,
        shape=stack.shape,
        dtype="uint8",
        chunk_shape=(32, 128, 128),
        voxel_size=stack.voxel_size,
        layer_type="segmentation",
        format="precomputed",
    )
    layer.write(layer.bounds, mask.astype(np.uint8))
    return url, gold, stack.voxel_size, mask


def test_export_swc_lies_on_the_gold_tracing(neuron_layer, tmp_path, capsys):
    url, gold, voxel_size, _ = neuron_layer
    swc = tmp_path / "neuron.swc"
    assert main(["export", "swc", url, str(swc)]) == 0
    tree = read_swc(swc)  # a valid SWC: one root per tree, parents before children
    assert f"{swc}: {len(tree)} nodes in" in capsys.readouterr().out
    assert len(tree) > 50 and (tree.n_children() >= 2).any()  # it branches, as the neuron does
    d = tree_distance(tree, gold, voxel_size)
    assert d.esa < 1.0 and d.pds < 0.05  # micrometres: within a few pixels of the gold
    header = swc.read_text().splitlines()[:4]
    assert any("kimimaro" in line for line in header)
    assert any(
        f"voxel size z,y,x {[round(v, 4) for v in voxel_size]} nm" in line for line in header
    )


def test_export_swc_of_a_box_is_in_the_box_coordinates(neuron_layer, tmp_path):
    url, _, voxel_size, mask = neuron_layer
    z, y, x = (int(np.median(a)) for a in np.nonzero(mask))  # a box around the neuron's middle
    start = (0, max(0, y - 48), max(0, x - 48))
    stop = (mask.shape[0], start[1] + 96, start[2] + 96)
    swc = tmp_path / "box.swc"
    assert main(["export", "swc", url, str(swc), "--roi", ",".join(map(str, start + stop))]) == 0
    tree = read_swc(swc)
    zyx = np.rint(tree.zyx).astype(int)
    box_shape = np.subtract(stop, start)
    assert (zyx >= -1).all() and (zyx <= box_shape).all()
    # nodes sit on the box's foreground (within a voxel: kimimaro centres between voxels)
    box = mask[tuple(slice(a, b) for a, b in zip(start, stop, strict=True))]
    near = [box[max(0, k - 1) : k + 2, max(0, j - 1) : j + 2, max(0, i - 1) : i + 2].any()
            for k, j, i in np.clip(zyx, 0, box_shape - 1)]  # fmt: skip
    assert np.mean(near) > 0.98


def test_export_swc_refusals_are_one_line(neuron_layer, lm_stack, tmp_path, capsys):
    url, *_ = neuron_layer
    image = str(tmp_path / "image")
    layer = create_volume(image, shape=(4, 16, 16), dtype="uint8", format="precomputed")
    layer.write(layer.bounds, np.ones((4, 16, 16), np.uint8))
    absent = str(tmp_path / "absent")
    for argv, says in [
        ([image, str(tmp_path / "a.swc")], "is an image layer"),
        ([absent, str(tmp_path / "b.swc")], "nothing to export at"),
        ([url, str(tmp_path / "c.swc"), "--roi", "0,0,0,1,2,2"], "no foreground voxel"),
    ]:
        assert main(["export", "swc", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1, err
    assert not list(tmp_path.glob("*.swc"))
