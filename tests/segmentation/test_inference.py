"""Sliding-window prediction and from probabilities to segmentations (segmentation/inference.py).

The window tests use a model whose logits are the logit of its input, so a correct tiling,
blending and padding gives the image back exactly, whatever the windows and overlaps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from neuroray.segmentation.inference import (
    blend_weights,
    predict_array,
    segment_affinities,
    segment_binary,
    window_starts,
)
from neuroray.segmentation.metrics import evaluate_segmentation
from neuroray.segmentation.targets import seg_to_affinities


class Echo(nn.Module):
    """Logits whose sigmoid is the input: channel 0 the image, channel 1 its negative."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = torch.logit(x.clamp(1e-6, 1 - 1e-6))
        return torch.cat([logit, -logit], dim=1)


class WindowMean(nn.Module):
    """Every voxel of a window gets the window's mean: shows which windows reached a voxel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.logit(x.mean(dim=(2, 3, 4), keepdim=True).expand_as(x))


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).uniform(0.05, 0.95, (13, 37, 42)).astype(np.float32)


def test_window_starts_cover_the_axis_with_the_last_window_flush():
    assert window_starts(10, 16, 12) == [0]  # smaller than a window: one (padded) window
    assert window_starts(16, 16, 12) == [0]
    assert window_starts(37, 16, 12) == [0, 12, 21]
    for size, window, stride in [(37, 16, 12), (100, 32, 24), (42, 8, 8), (9, 4, 1)]:
        starts = window_starts(size, window, stride)
        assert starts[-1] == size - window and starts == sorted(set(starts))
        assert all(b - a <= stride for a, b in zip(starts, starts[1:], strict=False))


def test_blend_weights_are_separable_positive_and_peak_in_the_middle():
    weights = blend_weights((4, 8, 6))
    assert weights.shape == (4, 8, 6) and weights.dtype == np.float32
    assert weights.min() >= 1e-3 ** 3 and weights.max() <= 1.0
    np.testing.assert_allclose(weights, weights[::-1, ::-1, ::-1])  # symmetric
    z, y, x = weights.sum((1, 2)), weights.sum((0, 2)), weights.sum((0, 1))
    np.testing.assert_allclose(weights, np.einsum("i,j,k->ijk", z, y, x) / weights.sum() ** 2,
                               rtol=1e-5)
    assert weights[2, 4, 3] == weights.max() and weights[0, 0, 0] == weights.min()
    assert np.all(blend_weights((1, 1, 5))[0, 0] > 0)  # a one-voxel axis is all ones


@pytest.mark.parametrize(
    "window, overlap",
    [
        ((4, 16, 16), None),  # default overlap: a quarter of the window
        ((5, 12, 20), (0, 0, 0)),  # no overlap, windows that do not divide the image
        ((13, 37, 42), None),  # one window, the whole image
        ((6, 9, 11), (5, 8, 10)),  # stride 1 on every axis
    ],
)
def test_an_echoing_model_gives_the_image_back_across_tilings(image, window, overlap):
    probs = predict_array(Echo(), image, window, overlap=overlap, batch_size=3)
    assert probs.shape == (2, *image.shape) and probs.dtype == np.float32
    np.testing.assert_allclose(probs[0], image, atol=1e-5)
    np.testing.assert_allclose(probs[1], 1 - image, atol=1e-5)


def test_images_smaller_than_a_window_are_padded_and_cropped_back(image):
    small = image[:3, :10, :7]
    probs = predict_array(Echo(), small, (8, 16, 16))
    assert probs.shape == (2, 3, 10, 7)
    np.testing.assert_allclose(probs[0], small, atol=1e-5)


def test_overlapping_windows_are_blended_not_overwritten(image):
    """Each voxel's value is a weighted mean of the windows that reached it: between their
    means, and the same whatever the batch size or the model's mode."""
    window = (13, 16, 16)
    model = WindowMean().train()
    probs = predict_array(model, image, window, batch_size=1)[0]
    assert model.training  # its mode is restored
    means = [image[:, y : y + 16, x : x + 16].mean()
             for y in window_starts(37, 16, 12) for x in window_starts(42, 16, 12)]
    assert min(means) - 1e-5 <= probs.min() and probs.max() <= max(means) + 1e-5
    assert len(np.unique(probs.round(6))) > len(means)  # blends, not a patchwork of windows
    np.testing.assert_allclose(probs, predict_array(model, image, window, batch_size=7)[0])


def test_binary_probabilities_become_masks_or_instances():
    probability = np.zeros((1, 8, 8), np.float32)
    probability[0, 1:3, 1:3] = 0.9
    probability[0, 5:7, 5:7] = 0.6
    probability[0, 0, 7] = 0.5  # not above the threshold
    mask = segment_binary(probability)
    assert mask.dtype == np.uint8 and mask.sum() == 8
    assert segment_binary(probability, threshold=0.7).sum() == 4
    instances = segment_binary(probability, instances=True)
    assert instances.dtype == np.uint32
    assert len(np.unique(instances[instances > 0])) == 2  # two separate blobs, two ids
    assert (instances > 0).sum() == 8


def test_clean_affinities_give_the_neurons_back():
    labels = np.zeros((8, 24, 24), np.uint32)
    labels[:, :12, :12], labels[:, :12, 12:], labels[:, 12:, :] = 1, 2, 3
    affs, _ = seg_to_affinities(labels)
    segmentations = segment_affinities(affs, [0.3, 0.7])
    assert sorted(segmentations) == [0.3, 0.7]
    for seg in segmentations.values():
        scores = evaluate_segmentation(seg, labels)
        assert scores.voi == pytest.approx(0.0, abs=1e-9) and scores.arand == pytest.approx(0.0)
