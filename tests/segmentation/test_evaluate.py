"""``neuroray evaluate`` as a library: known answers of evaluate_arrays, and evaluate_layers'
report, files and refusals (the CLI's one-line errors are in tests/test_validation.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from neuroray.errors import ConfigError, NeurorayError, RegistryError
from neuroray.platform.swc import SWCTree, rasterize, write_swc
from neuroray.platform.volume import create_volume
from neuroray.preview import label_colours
from neuroray.segmentation.evaluate import evaluate_arrays, evaluate_layers
from neuroray.segmentation.split_merge import SplitMerge


def halves() -> np.ndarray:
    """Two neurons of equal size, side by side along x."""
    labels = np.zeros((4, 8, 8), np.uint32)
    labels[..., :4], labels[..., 4:] = 1, 2
    return labels


def test_identical_segmentations_score_perfectly_whatever_their_ids():
    gt = halves()
    for seg in (gt, gt * 7 + 3, 3 - gt):  # the same partition under other ids
        scores = evaluate_arrays(seg, gt, "em")
        assert scores == pytest.approx(
            {"voi_split": 0, "voi_merge": 0, "voi": 0, "arand": 0, "cremi_score": 0}, abs=1e-9
        )


def test_a_split_into_equal_halves_costs_one_bit_of_split_and_no_merge():
    gt = halves()
    seg = gt.copy()
    seg[:, 4:] += 10  # every neuron cut in two equal halves along y: twice the objects
    assert len(np.unique(seg)) == 2 * len(np.unique(gt))
    scores = evaluate_arrays(seg, gt, "em")
    assert scores["voi_split"] == pytest.approx(1.0)  # log2(2): one bit per voxel
    assert scores["voi_merge"] == pytest.approx(0.0, abs=1e-9)
    # CREMI Rand: recall 1/2 (sums of squared counts halve), precision 1: arand = 1 - F1 = 1/3
    assert scores["arand"] == pytest.approx(1 / 3)
    assert scores["cremi_score"] == pytest.approx(math.sqrt(scores["voi"] * scores["arand"]))


def test_a_merge_is_the_mirror_image_of_a_split():
    gt = halves()
    merged = evaluate_arrays(np.ones_like(gt), gt, "em")
    assert merged["voi_merge"] == pytest.approx(1.0) and merged["voi_split"] == pytest.approx(0.0)
    split = gt.copy()
    split[:, 4:] += 10
    swapped = evaluate_arrays(gt, split, "em")  # gt as the segmentation of the split volume
    assert swapped["voi_merge"] == pytest.approx(evaluate_arrays(split, gt, "em")["voi_split"])


def test_ground_truth_zero_is_not_scored():
    gt = halves()
    gt[0] = 0  # an unlabelled slice
    seg = gt.copy()
    seg[0] = 5  # whatever the segmentation says there
    assert evaluate_arrays(seg, gt, "em")["voi"] == pytest.approx(0.0, abs=1e-9)


def test_binary_tasks_score_masks_by_dice_and_iou():
    truth = np.zeros((2, 4, 4), np.uint8)
    truth[:, :2] = 1  # 16 voxels
    half = np.zeros_like(truth)
    half[:, :1] = 1  # 8 of them, nothing else
    for task in ("binary", "mito", "lm"):
        assert evaluate_arrays(truth, truth, task) == {"dice": 1.0, "iou": 1.0}
        assert evaluate_arrays(half, truth, task) == pytest.approx(
            {"dice": 2 * 8 / 24, "iou": 8 / 16}
        )
        assert evaluate_arrays(1 - truth, truth, task) == {"dice": 0.0, "iou": 0.0}
    instances = half * 4  # instance ids count as foreground
    assert evaluate_arrays(instances, truth, "binary")["iou"] == pytest.approx(0.5)


def test_an_unknown_task_names_the_closest():
    with pytest.raises(RegistryError, match="em"):
        evaluate_arrays(halves(), halves(), "emm")


def layer(path, data: np.ndarray, **spec) -> str:
    volume = create_volume(path, shape=data.shape, dtype=data.dtype, chunk_shape=(4, 8, 8), **spec)
    volume[:] = data
    return str(path)


def test_layers_are_scored_in_the_roi_and_written_with_a_preview(tmp_path):
    gt = halves()
    seg = gt.copy()
    seg[2:, :, 4:] = 1  # a merge in the upper half only
    seg_url = layer(tmp_path / "seg", seg, layer_type="segmentation")
    gt_url = layer(tmp_path / "gt", gt, layer_type="segmentation")
    image_url = layer(tmp_path / "image", np.full(gt.shape, 128, np.uint8))

    clean = evaluate_layers(seg_url, gt_url, roi=(0, 0, 0, 2, 8, 8))
    assert clean.roi == [0, 0, 0, 2, 8, 8] and clean.metrics["voi"] == pytest.approx(0, abs=1e-9)
    assert clean.files == {}  # nothing written without --out

    out = tmp_path / "eval"
    report = evaluate_layers(seg_url, gt_url, image=image_url, out=str(out))
    assert report.metrics == pytest.approx(evaluate_arrays(seg, gt, "em"))
    assert report.metrics["voi_merge"] > 0 and report.roi == [0, 0, 0, 4, 8, 8]
    saved = json.loads((out / "metrics.json").read_text())
    assert {k: saved[k] for k in ("task", "roi", "metrics")} == {
        "task": "em", "roi": report.roi, "metrics": report.metrics
    }  # fmt: skip
    assert saved["voxel_size_nm_zyx"] == [1.0, 1.0, 1.0] and saved["preview"] == "preview.png"
    assert (out / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(report.files) == {"metrics", "preview"} and "voi_merge" in report.table()


def test_layers_that_cannot_be_compared_are_refused_before_anything_is_written(tmp_path):
    gt_url = layer(tmp_path / "gt", halves(), layer_type="segmentation")
    small = layer(tmp_path / "small", np.ones((4, 8, 4), np.uint32), layer_type="segmentation")
    out = tmp_path / "eval"
    with pytest.raises(NeurorayError, match="differ in shape"):
        evaluate_layers(small, gt_url, out=str(out))
    with pytest.raises(ConfigError, match="outside"):
        evaluate_layers(gt_url, gt_url, roi=(0, 0, 0, 4, 8, 9), out=str(out))
    with pytest.raises(ConfigError, match="border-nm"):
        evaluate_layers(gt_url, gt_url, border_threshold_nm=-1.0, out=str(out))
    with pytest.raises(RegistryError):
        evaluate_layers(gt_url, gt_url, task="nope", out=str(out))
    assert not out.exists()


# ---------------------------------------------------------------------- splits and merges shown
def three_neurons() -> tuple[np.ndarray, np.ndarray]:
    """Ground truth: neurons 1, 2, 3 in x thirds. Segmentation: neuron 1 cut in two (ids 5 and
    6, 6 the smaller quarter), neurons 2 and 3 merged into segment 7 (3 is the smaller)."""
    gt = np.zeros((6, 12, 24), np.uint32)
    gt[..., :8], gt[..., 8:16], gt[..., 16:20] = 1, 2, 3  # x 20..23 unlabelled
    seg = np.zeros_like(gt)
    seg[..., :6], seg[..., 6:8], seg[..., 8:20], seg[..., 20:] = 5, 6, 7, 9
    return seg, gt


def test_the_error_map_marks_a_known_split_and_a_known_merge():
    seg, gt = three_neurons()
    analysis = SplitMerge.of(seg, gt)
    split = analysis.split_mask(seg, gt)
    merge = analysis.merge_mask(seg, gt)
    expected_split = np.zeros(gt.shape, bool)
    expected_split[..., 6:8] = True  # neuron 1's voxels outside its main segment 5
    expected_merge = np.zeros(gt.shape, bool)
    expected_merge[..., 16:20] = True  # segment 7's voxels on neuron 3, not its main neuron 2
    np.testing.assert_array_equal(split, expected_split)
    np.testing.assert_array_equal(merge, expected_merge)
    assert not (split | merge)[..., 20:].any()  # unlabelled ground truth is no error
    # a segment takes the colour of the neuron it covers most: 5 -> 1, 7 -> 2; 9 is its own
    colours, truth = analysis.prediction_colours(seg), label_colours(gt)
    np.testing.assert_array_equal(colours[..., :6, :], truth[..., :6, :])
    np.testing.assert_array_equal(colours[..., 8:16, :], truth[..., 8:16, :])
    assert (colours[..., 20:, :] != 0).any(axis=-1).all()


def test_metrics_json_lists_the_worst_split_and_merge_with_real_ids(tmp_path):
    seg, gt = three_neurons()
    seg_url = layer(tmp_path / "seg", seg, layer_type="segmentation")
    gt_url = layer(tmp_path / "gt", gt, layer_type="segmentation")
    out = tmp_path / "eval"
    roi = (1, 2, 0, 6, 12, 24)
    evaluate_layers(seg_url, gt_url, roi=roi, out=str(out))  # no image: the figure all the same
    saved = json.loads((out / "metrics.json").read_text())
    (split, *_), (merge, *_) = saved["worst_splits"], saved["worst_merges"]
    z, y = 5, 10  # the roi's shape along z and y
    assert split == {"gt_id": 1, "split_voxels": z * y * 2, "gt_voxels": z * y * 8,
                     "segment_ids": [5, 6], "at_zyx": split["at_zyx"]}  # fmt: skip
    assert set(split["segment_ids"]) <= set(np.unique(seg).tolist())
    assert merge["segment_id"] == 7 and merge["gt_ids"] == [2, 3]
    assert merge["merge_voxels"] == z * y * 4 and merge["segment_id"] in np.unique(seg)
    # the voxels to jump to are in layer coordinates (the roi's start added) and in the error
    zs, ys, xs = split["at_zyx"]
    assert 1 <= zs < 6 and 2 <= ys < 12 and 6 <= xs < 8
    assert 16 <= merge["at_zyx"][2] < 20
    assert len(saved["worst_splits"]) == 1  # neurons 2 and 3 are whole: no split listed
    width = Image.open(out / "preview.png").width  # ground truth, prediction, errors
    assert 3 * 340 <= width < 4 * 340


def test_voxel_sizes_must_agree(tmp_path):
    seg, gt = three_neurons()
    seg_url = layer(tmp_path / "seg", seg, layer_type="segmentation", voxel_size=(40, 8, 8))
    same = layer(tmp_path / "same", gt, layer_type="segmentation", voxel_size=(40, 8, 8))
    other = layer(tmp_path / "other", gt, layer_type="segmentation", voxel_size=(30, 8, 8))
    assert evaluate_layers(seg_url, same).voxel_size == [40.0, 8.0, 8.0]
    out = tmp_path / "eval"
    with pytest.raises(ConfigError, match=r"voxel size 40x8x8 nm differs .* 30x8x8 nm"):
        evaluate_layers(seg_url, other, out=str(out))
    assert not out.exists()


def test_lm_with_an_swc_ground_truth_reports_tree_metrics(tmp_path):
    # a neurite along x at the centre of a small stack, 3 px thick
    tree = SWCTree.from_arrays(
        zyx=[[4, 12, x] for x in range(4, 44, 4)], parent_index=[-1, *range(9)], radii=1.5
    )
    swc = tmp_path / "gold.swc"
    write_swc(tree, swc)
    shape, voxel = (9, 24, 48), (1000.0, 300.0, 300.0)
    found = rasterize(tree, shape, voxel, radius_floor=2.0).astype(np.uint8)
    seg_url = layer(tmp_path / "seg", found, voxel_size=voxel)
    good = evaluate_layers(seg_url, str(swc), task="lm")  # the SWC as the ground truth
    assert good.metrics["dice"] == pytest.approx(1.0)
    assert good.metrics["esa_um"] < 0.5 and good.metrics["node_f1"] > 0.9
    shifted = np.roll(found, 8, axis=1)  # 8 px = 2.4 um off in y
    shifted_url = layer(tmp_path / "shifted", shifted, voxel_size=voxel)
    gt_url = layer(tmp_path / "gt", found, voxel_size=voxel)
    bad = evaluate_layers(shifted_url, gt_url, task="lm", swc=str(swc), out=str(tmp_path / "o"))
    assert bad.metrics["esa_um"] > 1.5 and bad.metrics["node_f1"] < good.metrics["node_f1"]
    assert {"esa_um", "dsa_um", "pds", "node_precision", "node_recall"} <= set(bad.metrics)
    saved = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert saved["metrics"]["esa_um"] == pytest.approx(bad.metrics["esa_um"])
    with pytest.raises(ConfigError, match="--task lm"):
        evaluate_layers(seg_url, str(swc), task="em")
