"""Affinity targets: the waterz convention, label 0, boundary growing and class weights."""

from __future__ import annotations

import numpy as np
import pytest

from neuroray.platform.volume import open_volume
from neuroray.segmentation.targets import (
    LONG_RANGE_OFFSETS,
    NEAREST_OFFSETS,
    TargetError,
    balance_weights,
    grow_boundary,
    seg_to_affinities,
)


def _brute_force_affinities(labels, offsets, background):
    """The documented definition, voxel by voxel."""
    affs = np.zeros((len(offsets), *labels.shape), np.float32)
    mask = np.zeros_like(affs)
    for c, offset in enumerate(offsets):
        for v in np.ndindex(labels.shape):
            u = tuple(np.subtract(v, offset))
            if not all(0 <= i < n for i, n in zip(u, labels.shape, strict=True)):
                continue
            objects = labels[v] != 0 and labels[u] != 0
            affs[c][v] = labels[v] == labels[u] and objects
            mask[c][v] = objects if background == "unknown" else 1
    return affs, mask


def test_nearest_affinity_links_each_voxel_to_its_negative_neighbour():
    labels = np.array([[[1, 1, 2, 2]]])
    affs, mask = seg_to_affinities(labels)
    assert affs.dtype == mask.dtype == np.float32
    assert affs.shape == (3, 1, 1, 4)
    # x channel: voxel v against v - (0, 0, 1); the first voxel has no such neighbour
    assert affs[2, 0, 0].tolist() == [0, 1, 0, 1]
    assert mask[2, 0, 0].tolist() == [0, 1, 1, 1]
    # a single section and a single row: no z or y neighbour anywhere
    assert not mask[:2].any()


@pytest.mark.parametrize("background", ["boundary", "unknown"])
@pytest.mark.parametrize(
    "offsets", [NEAREST_OFFSETS, LONG_RANGE_OFFSETS[:5] + ((-1, 2, 0), (0, -2, -3))]
)
def test_affinities_match_the_definition(offsets, background):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, size=(4, 5, 6))
    expected = _brute_force_affinities(labels, offsets, background)
    got = seg_to_affinities(labels, offsets, background=background)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


def test_label_zero_is_boundary_or_unknown():
    labels = np.array([[[1, 0, 0, 2]]])
    boundary_affs, boundary_mask = seg_to_affinities(labels, background="boundary")
    unknown_affs, unknown_mask = seg_to_affinities(labels, background="unknown")
    np.testing.assert_array_equal(boundary_affs, unknown_affs)
    assert not boundary_affs[2].any()  # 1-0, 0-0 and 0-2 are never links
    assert boundary_mask[2, 0, 0].tolist() == [0, 1, 1, 1]  # known cuts
    assert unknown_mask[2, 0, 0].tolist() == [0, 0, 0, 0]  # unknown edges


def test_gala_zero_separates_every_object(em_volume):
    """fib_gala_train's 0 (or synth_em's boundary gap) lies between all objects: masked out, no
    cut would remain to learn."""
    labels = open_volume(em_volume.labels)[:20]
    affs, mask = seg_to_affinities(labels, background="boundary")
    cuts = (affs == 0) & (mask == 1)
    assert cuts.mean() > 0.05
    affs, mask = seg_to_affinities(labels, background="unknown")
    assert (affs[mask == 1] == 1).all()


def test_grow_boundary_opens_a_gap_between_touching_objects():
    labels = np.array([[[1, 1, 1, 2, 2, 2]]])
    assert grow_boundary(labels, 1)[0, 0].tolist() == [1, 1, 0, 0, 2, 2]
    assert grow_boundary(labels, 2)[0, 0].tolist() == [1, 0, 0, 0, 0, 2]
    assert grow_boundary(labels, 0)[0, 0].tolist() == labels[0, 0].tolist()
    stacked = np.array([[[1]], [[2]]])  # objects touching in z only
    assert grow_boundary(stacked, 1, only_xy=True).ravel().tolist() == [1, 2]
    assert grow_boundary(stacked, 1).ravel().tolist() == [0, 0]


def _touching_objects(labels) -> bool:
    """Whether two different non-zero labels are face neighbours anywhere."""
    for axis in range(3):
        a = np.moveaxis(labels, axis, 0)
        if ((a[1:] != a[:-1]) & (a[1:] != 0) & (a[:-1] != 0)).any():
            return True
    return False


def test_grow_boundary_on_touching_medulla_labels(em_dense):
    labels = open_volume(em_dense.labels)[:32, :32, :32]  # fib_medulla_s2 or the synthetic cube
    assert _touching_objects(labels)
    grown = grow_boundary(labels, 1)
    assert not _touching_objects(grown)
    kept = grown != 0
    np.testing.assert_array_equal(grown[kept], labels[kept])


def test_balance_weights_give_cuts_and_links_equal_total_weight(em_volume):
    labels = open_volume(em_volume.labels)[:20]
    affs, mask = seg_to_affinities(labels, LONG_RANGE_OFFSETS)
    weights = balance_weights(affs, mask)
    assert weights.shape == affs.shape and weights.dtype == np.float32
    assert not weights[mask == 0].any()
    for c in range(affs.shape[0]):
        positive = weights[c][(affs[c] == 1) & (mask[c] == 1)].sum()
        negative = weights[c][(affs[c] == 0) & (mask[c] == 1)].sum()
        assert positive == pytest.approx(negative, rel=1e-4)
        assert positive + negative == pytest.approx(mask[c].sum(), rel=1e-4)


def test_balance_weights_clip_rare_classes():
    affs = np.ones((1, 1, 1, 100), np.float32)
    affs[0, 0, 0, 0] = 0  # 1 % cuts, clipped to 5 %
    weights = balance_weights(affs, clip=(0.05, 0.95))
    assert weights[0, 0, 0, 0] == pytest.approx(0.5 / 0.05)
    assert weights[0, 0, 0, 1] == pytest.approx(0.5 / 0.95)
    assert not balance_weights(affs, np.zeros_like(affs)).any()


@pytest.mark.parametrize(
    "call",
    [
        lambda: seg_to_affinities(np.zeros((2, 2), int)),
        lambda: seg_to_affinities(np.zeros((2, 2, 2), np.float32)),
        lambda: seg_to_affinities(np.zeros((2, 2, 2), int), [(0, 0, 0)]),
        lambda: seg_to_affinities(np.zeros((2, 2, 2), int), [(1, 0)]),
        lambda: seg_to_affinities(np.zeros((2, 2, 2), int), background="nothing"),
        lambda: balance_weights(np.zeros((1, 2, 2, 2)), np.zeros((1, 2, 2, 3))),
        lambda: grow_boundary(np.zeros((2, 2, 2), int), -1),
    ],
)
def test_bad_input_raises_target_error(call):
    with pytest.raises(TargetError):
        call()
