"""The no-learning baseline: fitted on a training part only, it beats trivial segmentations on the
held-out part (real fib_medulla_s2 / vnc_stack1 / DIADEM OP_1 crops where the data is, the
synthetic volumes of tests/conftest.py otherwise), chooses polarity by itself, and gives known
answers on volumes built by hand."""

from __future__ import annotations

import numpy as np
import pytest

from neuroray.platform.lm_data import label_mask
from neuroray.platform.volume import open_volume
from neuroray.segmentation.baseline import (
    BaselineError,
    _dice_curves,
    baseline_summary,
    fit_binary_baseline,
    fit_em_baseline,
    intensity_affinities,
    sigma_voxels,
)
from neuroray.segmentation.metrics import dice, evaluate_segmentation

EM_FIT = {"sigmas": (5.0, 10.0), "thresholds": (0.3, 0.45, 0.6)}
"""A small search for the fixtures (the defaults try 5 sigmas x 19 thresholds)."""


def _load(volume) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    image = open_volume(volume.raw)
    return image[volume.region], open_volume(volume.labels)[volume.region], image.voxel_size


@pytest.fixture(scope="module")
def em_split(em_dense):
    """Touching neurons 64 x 128 x 128 (fib_medulla_s2 z 100-164, or the synthetic cube), split
    in z: training z < 32, held out z >= 32."""
    image, labels, voxel = _load(em_dense)
    return image[:32], labels[:32], image[32:], labels[32:], voxel


@pytest.fixture(scope="module")
def em_fit(em_split):
    train_image, train_labels, _, _, voxel = em_split
    return fit_em_baseline(train_image, train_labels, voxel, **EM_FIT)


# ------------------------------------------------------------------ EM
def test_em_baseline_beats_trivial_segmentations_on_held_out_data(em_split, em_fit):
    _, _, test_image, test_labels, _ = em_split
    segmentation = em_fit.segment(test_image)
    assert segmentation.shape == test_labels.shape and segmentation.dtype == np.uint64
    voi = evaluate_segmentation(segmentation, test_labels).voi
    one_object = np.ones(test_labels.shape, np.uint32)
    every_voxel = np.arange(1, test_labels.size + 1, dtype=np.uint32).reshape(test_labels.shape)
    assert voi < evaluate_segmentation(one_object, test_labels).voi
    assert voi < evaluate_segmentation(every_voxel, test_labels).voi


def test_em_fit_keeps_the_best_training_candidate_and_segment_reproduces_it(em_split, em_fit):
    train_image, train_labels, _, _, _ = em_split
    assert len(em_fit.search) == 2 * 3
    assert em_fit.train_voi == min(row["voi"] for row in em_fit.search)
    assert (em_fit.sigma_nm, em_fit.threshold) in [(5.0, t) for t in (0.3, 0.45, 0.6)] + [
        (10.0, t) for t in (0.3, 0.45, 0.6)
    ]
    # the fit's iterated waterz run scores what segment() (segment_affinities) produces
    again = evaluate_segmentation(em_fit.segment(train_image), train_labels).voi
    assert again == pytest.approx(em_fit.train_voi, abs=1e-9)


def test_em_known_answer_two_cells_split_by_a_dark_membrane():
    """Two bright boxes with a dark membrane between them: two objects, exactly."""
    image = np.full((8, 24, 24), 200, np.uint8)
    image[:, :, 11:13] = 20  # a membrane two voxels thick, across the whole volume
    labels = np.zeros(image.shape, np.uint32)
    labels[:, :, :11], labels[:, :, 13:] = 1, 2  # the membrane is unlabelled (ignored)
    fit = fit_em_baseline(image, labels, (10.0, 10.0, 10.0), sigmas=(0.0,), thresholds=(0.5,))
    scores = evaluate_segmentation(fit.segment(image), labels)
    assert scores.voi == pytest.approx(0.0, abs=1e-9) and scores.arand == pytest.approx(0.0)


def test_intensity_affinities_are_the_mean_of_the_two_normalised_voxels():
    image = np.zeros((3, 4, 5), np.float32)
    image[1] = 1.0  # normalised: 0 and 1 (1st / 99th percentile of {0, 1})
    affs = intensity_affinities(image, 0.0, (1.0, 1.0, 1.0))
    assert affs.shape == (3, 3, 4, 5) and affs.dtype == np.float32
    # z edges: between slice z and z - 1, stored at z; slice 0 keeps its own value
    assert affs[0, :, 0, 0].tolist() == [0.0, 0.5, 0.5]
    assert np.array_equal(affs[1], image) and np.array_equal(affs[2], image)


def test_sigma_is_in_nm_and_follows_the_voxel_size():
    assert sigma_voxels(10.0, (50.0, 5.0, 5.0)) == (0.2, 2.0, 2.0)
    assert sigma_voxels((0.0, 10.0, 20.0), (10.0, 10.0, 10.0)) == (0.0, 1.0, 2.0)
    with pytest.raises(BaselineError, match="sigma"):
        sigma_voxels(-1.0, (10.0, 10.0, 10.0))


# ------------------------------------------------------------------ binary tasks
def _blobs(seed: int, bright: bool) -> tuple[np.ndarray, np.ndarray]:
    """Noisy image with foreground boxes brighter (or darker) than the background."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((12, 48, 48), np.uint8)
    for z, y, x in rng.integers(0, 36, size=(6, 3)):
        labels[z % 8 : z % 8 + 4, y : y + 10, x : x + 10] = 1
    signal = np.where(labels > 0, 170.0, 90.0) if bright else np.where(labels > 0, 90.0, 170.0)
    image = np.clip(signal + rng.normal(0, 25, labels.shape), 0, 255).astype(np.uint8)
    return image, labels


@pytest.mark.parametrize("bright", [True, False], ids=["bright", "dark"])
def test_binary_polarity_is_chosen_on_training_data(bright):
    train_image, train_labels = _blobs(0, bright)
    test_image, test_labels = _blobs(1, bright)
    fit = fit_binary_baseline(train_image, train_labels, (10.0, 10.0, 10.0))
    assert fit.polarity == ("above" if bright else "below")
    assert 90 < fit.threshold < 170
    assert dice(fit.segment(test_image), test_labels) > 0.9


def test_binary_known_answer_without_noise():
    image, labels = _blobs(2, True)
    image = np.where(labels > 0, 200, 40).astype(np.uint8)
    fit = fit_binary_baseline(image, labels, (10.0, 10.0, 10.0), sigmas=(0.0,))
    assert fit.train_dice == 1.0 and fit.polarity == "above" and 40 < fit.threshold <= 200
    assert np.array_equal(fit.segment(image), labels)


def test_histogram_dice_equals_dice_of_the_thresholded_image():
    rng = np.random.default_rng(3)
    value = rng.normal(0, 1, (6, 20, 20)).astype(np.float32)
    truth = value + rng.normal(0, 1, value.shape) > 0.5
    edges = np.linspace(-3, 3, 25, dtype=np.float32)
    curves = _dice_curves(value, truth, edges)
    for k, edge in enumerate(edges):
        assert curves[0, k] == pytest.approx(dice(value >= edge, truth))
        assert curves[1, k] == pytest.approx(dice(value < edge, truth))


def test_binary_fit_averages_dice_over_training_volumes():
    volumes = [_blobs(seed, True) for seed in (4, 5)]
    fit = fit_binary_baseline([v[0] for v in volumes], [v[1] for v in volumes], (1.0, 1.0, 1.0))
    mean = np.mean([dice(fit.segment(image), labels) for image, labels in volumes])
    assert fit.train_dice == pytest.approx(mean)


def test_mitochondria_are_found_dark(mito_volume):
    """vnc_stack1 (or synth_em) mitochondria: dark, fitted on sections 0-15, tested on 16-19."""
    image, labels, voxel = _load(mito_volume)
    fit = fit_binary_baseline(image[:16], labels[:16], voxel, sigmas=(0.0, 4 * voxel[1]))
    assert fit.polarity == "below"
    score = dice(fit.segment(image[16:]), labels[16:])
    assert score > dice(np.ones_like(labels[16:]), labels[16:])


def test_lm_neurons_are_found_bright(lm_stack):
    volume = open_volume(lm_stack.tif)
    image = volume[:]
    gold = label_mask(lm_stack.swc, image.shape, volume.voxel_size, radius_floor_px=1.5)
    half = image.shape[0] // 2
    fit = fit_binary_baseline(image[:half], gold[:half], volume.voxel_size, sigmas=(0.0, 500.0))
    assert fit.polarity == "above"
    assert dice(fit.segment(image[half:]), gold[half:]) > dice(
        np.ones_like(gold[half:]), gold[half:]
    )


# ------------------------------------------------------------------ summary rows
@pytest.mark.parametrize("task", ["em", "mito"])
def test_summary_parameters_depend_on_training_data_only(task, em_split):
    """Property: whatever the held-out labels and image are, the chosen parameters are the same
    (only the test metrics move), so no choice can have read the test part."""
    if task == "em":
        train_image, train_labels, test_image, test_labels, voxel = em_split
        options = EM_FIT
    else:
        train_image, train_labels = _blobs(6, False)
        test_image, test_labels = _blobs(7, False)
        voxel, options = (10.0, 10.0, 10.0), {}
    rng = np.random.default_rng(0)
    honest = baseline_summary(
        task, train_image, train_labels, test_image, test_labels, voxel, **options
    )
    scrambled_labels = rng.permutation(test_labels.ravel()).reshape(test_labels.shape)
    scrambled_image = rng.permutation(test_image.ravel()).reshape(test_image.shape)
    other = baseline_summary(
        task, train_image, train_labels, scrambled_image, scrambled_labels, voxel, **options
    )
    assert honest["params"] == other["params"]
    key = "voi" if task == "em" else "dice"
    assert honest[key] != other[key]
    assert honest["name"].startswith("no-learning") and honest["task"] == task
    expected = {"voi", "voi_split", "voi_merge", "arand"} if task == "em" else {"dice", "iou"}
    assert expected <= set(honest) and {"fit", "segment"} == set(honest["seconds"])
    assert {"sigma_nm", "threshold"} <= set(honest["params"])


def test_bad_training_data_is_refused_with_a_message():
    image = np.zeros((4, 8, 8), np.uint8)
    with pytest.raises(BaselineError, match="same 3D"):
        fit_binary_baseline(image, np.zeros((4, 8, 9), np.uint8), (1.0, 1.0, 1.0))
    with pytest.raises(BaselineError, match="no labelled voxel"):
        fit_binary_baseline(image, np.zeros_like(image), (1.0, 1.0, 1.0))
    with pytest.raises(BaselineError, match="voxel_size"):
        fit_em_baseline(image, np.ones_like(image), (1.0, 0.0, 1.0))
    with pytest.raises(BaselineError, match="one labels volume per image"):
        fit_em_baseline([image, image], [np.ones_like(image)], (1.0, 1.0, 1.0))
