"""``neuroray evaluate`` as a library: known answers of evaluate_arrays, and evaluate_layers'
report, files and refusals (the CLI's one-line errors are in tests/test_validation.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from neuroray.errors import ConfigError, NeurorayError, RegistryError
from neuroray.platform.volume import create_volume
from neuroray.segmentation.evaluate import evaluate_arrays, evaluate_layers


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
    assert saved == {"task": "em", "roi": report.roi, "metrics": report.metrics}
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
