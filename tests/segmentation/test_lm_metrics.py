"""LM metrics: Dice / IoU / HD95 known answers, Vaa3D ESA / DSA / PDS, node P/R/F1, skeletons."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from neuroray.platform.swc import SWCTree, rasterize, read_swc
from neuroray.platform.volume import open_volume
from neuroray.segmentation.lm_metrics import (
    dice,
    hd95,
    iou,
    lm_scores,
    node_scores,
    point_segment_distances,
    sample_segments,
    skeletonize,
    tree_distance,
)
from neuroray.segmentation.metrics import MetricError


def line_tree(points_zyx) -> SWCTree:
    """A chain: node i's parent is node i - 1."""
    points = np.asarray(points_zyx, dtype=float)
    return SWCTree.from_arrays(points, np.arange(len(points)) - 1)


def random_tree(rng: np.random.Generator, n: int, spread: float = 20.0) -> SWCTree:
    steps = rng.normal(scale=spread / 5, size=(n, 3))
    parents = np.array([-1] + [int(rng.integers(0, i)) for i in range(1, n)])
    zyx = np.zeros((n, 3))
    for i in range(1, n):
        zyx[i] = zyx[parents[i]] + steps[i]
    return SWCTree.from_arrays(zyx, parents)


# ---------------------------------------------------------------------------------- voxel metrics


def test_dice_iou_known_answers():
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros_like(a)
    a[0, 0, :4] = a[1, 0, :4] = True  # 8 voxels
    b[1, 0, :4] = b[2, 0, :4] = True  # 8 voxels, 4 shared
    assert dice(a, b) == pytest.approx(0.5)
    assert iou(a, b) == pytest.approx(4 / 12)


def test_hd95_known_answers_in_physical_units():
    a = np.zeros((5, 10, 30), bool)
    a[2, 3, 5:25] = True
    b = np.roll(a, 2, axis=1)  # parallel line two voxels away in y
    assert hd95(a, b, (7.0, 3.0, 1.0)) == pytest.approx(6.0)
    assert hd95(a, a, (7.0, 3.0, 1.0)) == 0.0

    p, q = np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool)
    p[1, 1, 1] = q[2, 2, 1] = True
    assert hd95(p, q, (2.0, 3.0, 1.0)) == pytest.approx(math.sqrt(4 + 9))
    assert hd95(np.zeros_like(p), np.zeros_like(p)) == 0.0
    assert hd95(p, np.zeros_like(p)) == math.inf


def test_hd95_equals_the_distance_transform_definition():
    rng = np.random.default_rng(3)
    a = ndimage.binary_opening(rng.random((12, 30, 30)) > 0.6)
    b = ndimage.binary_opening(rng.random((12, 30, 30)) > 0.6)
    voxel = (2.5, 1.0, 0.7)
    directed = []
    for x, y in ((a, b), (b, a)):
        surf_x = x & ~ndimage.binary_erosion(x, border_value=0)
        surf_y = y & ~ndimage.binary_erosion(y, border_value=0)
        field = ndimage.distance_transform_edt(~surf_y, sampling=voxel)
        directed.append(np.percentile(field[surf_x], 95))
    assert hd95(a, b, voxel) == pytest.approx(max(directed))


def test_hd95_ignores_the_worst_five_percent_and_is_symmetric():
    a = np.zeros((3, 3, 210), bool)
    a[1, 1, :200] = True
    b = a.copy()
    b[1, 1, 205] = True  # one stray voxel, 6 voxels beyond the line's end: < 5% of surface
    assert hd95(a, b) == 0.0 and hd95(b, a) == 0.0
    assert hd95(a, b, percentile=100) == pytest.approx(6.0)
    with pytest.raises(MetricError):
        hd95(a, b[:, :, :100])


# ---------------------------------------------------------------------------------- Vaa3D scores


def test_tree_distance_is_zero_for_identical_trees():
    tree = random_tree(np.random.default_rng(0), 40)
    d = tree_distance(tree, tree)
    assert d.esa == pytest.approx(0, abs=1e-9) and d.dsa == 0 and d.pds == 0


def test_tree_distance_hand_computed_parallel_lines():
    a = line_tree([[0, 0, 0], [0, 0, 4]])
    b = line_tree([[0, 3, 0], [0, 3, 4]])
    d = tree_distance(a, b, unit_nm=1)  # voxel size 1 nm, distances in nm
    # 5 samples each way (N = int(1 + 4 + 0.5)), every one 3 away: all "different"
    assert (d.n_12, d.n_21) == (5, 5)
    assert d.esa == pytest.approx(3) and d.dsa == pytest.approx(3) and d.pds == pytest.approx(1)


def test_tree_distance_hand_computed_partial_overlap():
    long, short = line_tree([[0, 0, 0], [0, 0, 4]]), line_tree([[0, 0, 0], [0, 0, 2]])
    d = tree_distance(long, short, unit_nm=1)
    # long -> short: x = 0..4 -> distances 0, 0, 0, 1, 2 (2 >= threshold 2 counts as different)
    # short -> long: x = 0, 1, 2 -> all 0
    assert d.esa_12 == pytest.approx(0.6) and d.esa_21 == 0
    assert d.esa == pytest.approx(0.3)
    assert d.dsa == pytest.approx(2.0)  # only one direction has different structure
    assert d.pds == pytest.approx((1 / 5 + 0 / 3) / 2)


def test_tree_distance_scales_voxels_to_micrometres():
    # one slice apart in z at 2.5 um slices: 2.5 um, above the 2 um threshold
    a = line_tree([[0, 0, 0], [0, 0, 10]])
    b = line_tree([[1, 0, 0], [1, 0, 10]])
    d = tree_distance(a, b, (2500.0, 330.0, 330.0))
    assert d.esa == pytest.approx(2.5) and d.pds == pytest.approx(1.0)
    near = tree_distance(a, b, (1000.0, 330.0, 330.0))
    assert near.esa == pytest.approx(1.0) and near.pds == 0 and near.dsa == 0
    # 10 px * 0.33 um = 3.3 um: int(1 + 3.3 + 0.5) = 4 samples per direction
    assert near.n_12 == 4


def test_tree_distance_is_symmetric():
    rng = np.random.default_rng(1)
    a, b = random_tree(rng, 30), random_tree(rng, 25)
    ab, ba = tree_distance(a, b), tree_distance(b, a)
    assert ab.esa == pytest.approx(ba.esa) and ab.dsa == pytest.approx(ba.dsa)
    assert ab.pds == pytest.approx(ba.pds)
    assert (ab.esa_12, ab.n_12) == pytest.approx((ba.esa_21, ba.n_21))


def test_point_segment_distance_matches_dense_sampling():
    rng = np.random.default_rng(2)
    points = rng.normal(size=(50, 3)) * 5
    start, end = rng.normal(size=(7, 3)) * 5, rng.normal(size=(7, 3)) * 5
    end[3] = start[3]  # a zero-length segment is a point
    t = np.linspace(0, 1, 20001)
    dense = (start[:, None] + t[None, :, None] * (end - start)[:, None]).reshape(-1, 3)
    expected = cdist(points, dense).min(1)
    for pairs in (10**6, 0):  # every pair, and the KD-tree pruned search
        got = point_segment_distances(points, start, end, brute_force_pairs=pairs)
        np.testing.assert_allclose(got, expected, atol=1e-3)
    samples = sample_segments(np.zeros((1, 3)), np.array([[0.0, 0.0, 3.0]]))
    np.testing.assert_allclose(samples[:, 2], [0, 1, 2, 3])  # Vaa3D: N = int(1 + 3 + 0.5) = 4
    assert len(sample_segments(np.zeros((1, 3)), np.array([[0.0, 0.0, 0.4]]))) == 1


# ---------------------------------------------------------------------------------- node scores


def test_pruned_search_equals_all_pairs_on_a_big_tree():
    rng = np.random.default_rng(4)
    tree = random_tree(rng, 400, spread=60)
    edges = tree.edges()
    start, end = tree.zyx[edges[:, 0]], tree.zyx[edges[:, 1]]
    points = rng.uniform(tree.zyx.min(0) - 10, tree.zyx.max(0) + 10, size=(3000, 3))
    exact = point_segment_distances(points, start, end, brute_force_pairs=10**8)
    pruned = point_segment_distances(points, start, end, brute_force_pairs=0)
    np.testing.assert_allclose(pruned, exact, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_node_scores_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    pred, gold = random_tree(rng, 60), random_tree(rng, 45)
    voxel = (900.0, 400.0, 300.0)
    threshold = 3.0
    scores = node_scores(pred, gold, voxel, threshold=threshold)
    d = cdist(pred.zyx * np.asarray(voxel) / 1000, gold.zyx * np.asarray(voxel) / 1000)
    precision = np.mean([any(row <= threshold) for row in d])
    recall = np.mean([any(col <= threshold) for col in d.T])
    assert scores.precision == pytest.approx(precision)
    assert scores.recall == pytest.approx(recall)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0
    assert scores.f1 == pytest.approx(f1)
    assert 0 < precision < 1 or 0 < recall < 1  # the case is not trivial


def test_node_scores_resampling_removes_density_bias():
    gold = line_tree([[0, 0, 0], [0, 0, 100]])  # two nodes 100 um apart
    dense = line_tree([[0, 0, x] for x in range(0, 101, 1)])
    raw = node_scores(dense, gold, threshold=2.0, unit_nm=1000, voxel_size=(1000,) * 3)
    assert raw.precision < 0.1  # nodes in the middle are far from gold *nodes*
    fair = node_scores(dense, gold, (1000,) * 3, threshold=2.0, resample_step=1.0)
    assert fair.precision == 1.0 and fair.recall == 1.0


def test_empty_trees_have_defined_scores():
    empty = skeletonize(np.zeros((4, 8, 8), bool))
    tree = line_tree([[0, 0, 0], [0, 0, 3]])
    assert len(empty) == 0
    d = tree_distance(empty, tree)
    assert d.esa == math.inf and d.pds == 1.0
    assert node_scores(empty, tree).f1 == 0.0
    assert tree_distance(empty, empty).esa == 0.0


# ---------------------------------------------------------------------------------- skeletons


def test_skeleton_of_a_tube_follows_its_axis():
    mask = np.zeros((9, 20, 60), bool)
    mask[3:6, 8:12, 5:55] = True
    voxel = (1000.0, 330.0, 330.0)
    skeleton = skeletonize(mask, voxel)
    assert len(skeleton) > 10
    zyx = skeleton.zyx
    assert np.all(np.abs(zyx[:, 0] - 4) <= 1) and np.all(np.abs(zyx[:, 1] - 9.5) <= 1.5)
    axis = line_tree([[4, 9.5, 5], [4, 9.5, 54]])
    d = tree_distance(skeleton, axis, voxel)
    assert d.esa < 1.0 and d.pds == 0  # within a slice (1 um) of the axis everywhere


def test_skeleton_of_rasterised_gold_is_close_to_the_gold(lm_stack):
    """DIADEM OP_1's gold tracing where the data is, synth_lm's tree (same voxels) otherwise."""
    stack = open_volume(lm_stack.tif)
    gold = read_swc(lm_stack.swc, allow_zero_radius=True)
    mask = rasterize(gold, stack.shape, stack.voxel_size, radius_floor=2.0)
    skeleton = skeletonize(mask, stack.voxel_size)
    d = tree_distance(skeleton, gold, stack.voxel_size)
    assert d.esa < 1.0 and d.pds < 0.05  # micrometres; the pixel is 0.33 um
    nodes = node_scores(skeleton, gold, stack.voxel_size, resample_step=1.0)
    assert nodes.f1 > 0.95

    scores = lm_scores(mask, mask, gold, stack.voxel_size, skeleton=skeleton)
    assert scores.dice == 1.0 and scores.hd95_um == 0.0 and scores.esa_um == pytest.approx(d.esa)
    shifted = np.roll(mask, 3, axis=2)  # 3 px = 0.99 um off
    moved = lm_scores(shifted, mask, gold, stack.voxel_size)
    assert moved.dice < 0.9 and 0.5 < moved.esa_um < 1.5
