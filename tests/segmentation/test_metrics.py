"""VOI / ARAND against waterz.evaluate and scikit-image on EM labels (real where ../shared/data
is, synthetic otherwise), hand-computed answers, invariances, the CREMI border mask, Dice / IoU."""

from __future__ import annotations

import fastremap
import numpy as np
import pytest
import skimage.metrics
import waterz

from neuroray.errors import RegistryError
from neuroray.platform.volume import open_volume
from neuroray.segmentation.agglomerate import agglomerate
from neuroray.segmentation.metrics import (
    RAND_CONVENTIONS,
    MetricError,
    adapted_rand_error,
    contingency_table,
    cremi_border_mask,
    dice,
    evaluate_segmentation,
    iou,
    voi,
)
from neuroray.segmentation.targets import seg_to_affinities


@pytest.fixture(scope="module")
def gala(em_volume):
    """Labels with 0 between all objects: fib_gala_train, or synth_em's with boundary gaps."""
    return open_volume(em_volume.labels)[:].astype(np.uint64)


@pytest.fixture(scope="module")
def medulla(em_dense):
    """Touching labels, no 0: fib_medulla_s2's first 64^3 corner, or the synthetic dense cube's."""
    return open_volume(em_dense.labels)[:64, :64, :64].astype(np.uint64)


@pytest.fixture(scope="module")
def gala_segmentation(gala):
    return _agglomerated(gala, 0.35, 0.6)


@pytest.fixture(scope="module")
def medulla_segmentation(medulla):
    return _agglomerated(medulla, 0.35, 0.6)


def _agglomerated(labels, noise, threshold, seed=0):
    """A realistic imperfect segmentation: waterz on noisy ground-truth affinities."""
    affs, _ = seg_to_affinities(labels)
    rng = np.random.default_rng(seed)
    noisy = np.clip(affs + rng.normal(0, noise, affs.shape), 0, 1).astype(np.float32)
    return agglomerate(noisy, [threshold])[threshold]


def _perturbed(labels, seed=0):
    """Ground truth with objects merged in pairs, a plane of splits and new ids on label 0."""
    rng = np.random.default_rng(seed)
    ids = np.unique(labels)
    ids = ids[ids != 0]  # dense labels may have no 0
    merge_into = dict(zip(ids.tolist(), ids.tolist(), strict=True))
    for a, b in rng.choice(ids, size=(len(ids) // 4, 2), replace=False):
        merge_into[int(a)] = int(b)
    merge_into[0] = 0
    perturbed = fastremap.remap(labels, merge_into)
    perturbed[:, :, labels.shape[2] // 2 :] += np.uint64(10_000)
    perturbed[labels == 0] = 20_000
    return perturbed * np.uint64(1 << 40)  # big uint64 ids


@pytest.mark.parametrize("make", ["agglomerated", "perturbed"])
@pytest.mark.parametrize("volume", ["gala", "medulla"])
def test_cremi_convention_equals_waterz_evaluate(volume, make, request):
    gt = request.getfixturevalue(volume)
    if make == "agglomerated":
        seg = request.getfixturevalue(f"{volume}_segmentation")
    else:
        seg = _perturbed(gt)
    assert not (seg[gt != 0] == 0).any()  # waterz counts segment 0 as a segment
    reference = waterz.evaluate(seg, gt)
    scores = evaluate_segmentation(seg, gt, convention="cremi")
    assert scores.voi_split == pytest.approx(reference["voi_split"], abs=1e-9)
    assert scores.voi_merge == pytest.approx(reference["voi_merge"], abs=1e-9)
    assert scores.rand_split == pytest.approx(reference["rand_split"], rel=1e-9)
    assert scores.rand_merge == pytest.approx(reference["rand_merge"], rel=1e-9)
    assert 0.01 < scores.voi and 0.001 < scores.arand < 1  # an imperfect segmentation
    f1 = 2 / (1 / reference["rand_split"] + 1 / reference["rand_merge"])
    assert scores.arand == pytest.approx(1 - f1, rel=1e-9)
    assert scores.cremi_score == pytest.approx(np.sqrt(scores.voi * scores.arand))


@pytest.mark.parametrize("make", ["agglomerated", "perturbed"])
def test_pairs_convention_equals_scikit_image(medulla, medulla_segmentation, make):
    seg = medulla_segmentation if make == "agglomerated" else _perturbed(medulla)
    compact = fastremap.renumber(seg)[0]  # skimage indexes a table by the ids themselves
    are, _, _ = skimage.metrics.adapted_rand_error(medulla, compact)
    split, merge = skimage.metrics.variation_of_information(medulla, compact, ignore_labels=(0,))
    scores = evaluate_segmentation(seg, medulla, convention="pairs")
    assert scores.arand == pytest.approx(are, rel=1e-9)
    assert scores.voi_split == pytest.approx(split, abs=1e-9)
    assert scores.voi_merge == pytest.approx(merge, abs=1e-9)


def test_hand_computed_split():
    gt = np.array([[[1, 1, 1, 1]]])
    seg = np.array([[[1, 1, 2, 2]]])
    cremi = evaluate_segmentation(seg, gt, convention="cremi")
    assert (cremi.voi_split, cremi.voi_merge) == pytest.approx((1.0, 0.0))
    # squares: sum n_ij^2 = 8, sum a^2 = 16, sum b^2 = 8 -> recall 1/2, precision 1
    assert (cremi.rand_split, cremi.rand_merge, cremi.arand) == pytest.approx((0.5, 1.0, 1 / 3))
    # pairs: 4 / 12 and 4 / 4 -> F1 = 1/2
    pairs = evaluate_segmentation(seg, gt, convention="pairs")
    assert (pairs.rand_split, pairs.rand_merge, pairs.arand) == pytest.approx((1 / 3, 1.0, 0.5))
    # the transpose is a merge
    swapped = evaluate_segmentation(gt, seg, convention="cremi")
    assert (swapped.voi_split, swapped.voi_merge) == pytest.approx((0.0, 1.0))


def test_hand_computed_cremi_segment_zero_as_singletons():
    gt = np.array([[[1, 1, 2, 2, 0]]])
    seg = np.array([[[0, 0, 3, 3, 3]]])
    # CREMI: c = 2 voxels of segment 0 in the ground truth, n = 5 voxels in the volume
    # sum_a = 8, sum_b = 4 + 2/5, sum_ab = 4 + 2/5 -> recall 0.55, precision 1 -> ARAND 9/31
    cremi = evaluate_segmentation(seg, gt, convention="cremi")
    assert (cremi.rand_split, cremi.rand_merge) == pytest.approx((0.55, 1.0))
    assert cremi.arand == pytest.approx(9 / 31)
    # pairs (scikit-image): segment 0 is a segment like any other, so nothing is wrong
    assert adapted_rand_error(seg, gt, convention="pairs") == pytest.approx(0.0)
    assert voi(seg, gt) == pytest.approx((0.0, 0.0))


def test_contingency_table_counts_pairs_and_keeps_ids():
    big = np.uint64(2**64 - 1)
    gt = np.array([[[0, 5, 5, 7, 7, 7]]], dtype=np.uint64)
    seg = np.array([[[9, big, big, big, 3, 3]]], dtype=np.uint64)
    table = contingency_table(seg, gt)
    found = {
        (int(table.gt_ids[r]), int(table.seg_ids[c])): int(n)
        for r, c, n in zip(table.rows, table.cols, table.counts, strict=True)
    }
    assert found == {(5, int(big)): 2, (7, int(big)): 1, (7, 3): 2}
    assert table.total == 5 and table.n_voxels == 6
    assert table.to_sparse().sum() == 5
    masked = contingency_table(seg, gt, mask=np.arange(6).reshape(gt.shape) < 4)
    assert masked.total == 3


@pytest.mark.parametrize("convention", RAND_CONVENTIONS.names())
def test_scores_ignore_label_permutation(gala, gala_segmentation, convention):
    seg = gala_segmentation
    rng = np.random.default_rng(1)
    gt_ids, seg_ids = np.unique(gala)[1:], np.unique(seg)
    gt_perm = dict(zip(gt_ids.tolist(), rng.permutation(gt_ids).tolist(), strict=True)) | {0: 0}
    seg_perm = dict(zip(seg_ids.tolist(), (rng.permutation(seg_ids) * 7919).tolist(), strict=True))
    before = evaluate_segmentation(seg, gala, convention=convention)
    after = evaluate_segmentation(
        fastremap.remap(seg, seg_perm), fastremap.remap(gala, gt_perm), convention=convention
    )
    for field in ("voi_split", "voi_merge", "rand_split", "rand_merge", "arand"):
        assert getattr(after, field) == pytest.approx(getattr(before, field), rel=1e-12)


@pytest.mark.parametrize("convention", RAND_CONVENTIONS.names())
def test_identity_scores_perfectly(medulla, convention):
    relabelled = fastremap.renumber(medulla)[0] * np.uint64(3)
    for seg in (medulla, relabelled):
        scores = evaluate_segmentation(seg, medulla, convention=convention)
        assert scores.voi == pytest.approx(0.0, abs=1e-12)
        assert scores.arand == pytest.approx(0.0, abs=1e-12)
        assert scores.cremi_score == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("convention", RAND_CONVENTIONS.names())
def test_ground_truth_zero_is_ignored(gala, gala_segmentation, convention):
    seg = gala_segmentation
    scrambled = seg.copy()
    background = gala == 0
    scrambled[background] = np.random.default_rng(2).integers(1, 5, background.sum())
    a = evaluate_segmentation(seg, gala, convention=convention)
    b = evaluate_segmentation(scrambled, gala, convention=convention)
    assert a.as_dict() | {"n_voxels": 0} == pytest.approx(b.as_dict() | {"n_voxels": 0})
    assert a.n_voxels == int((gala != 0).sum())
    masked = evaluate_segmentation(seg, gala, mask=gala != 7, convention=convention)
    zeroed = evaluate_segmentation(seg, np.where(gala == 7, 0, gala), convention=convention)
    assert masked.voi == pytest.approx(zeroed.voi) and masked.arand == pytest.approx(zeroed.arand)


def test_cremi_border_mask_by_hand():
    gt = np.array([[[1, 1, 1, 1, 2, 2, 2, 2]]])
    assert cremi_border_mask(gt, 0).ravel().tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    wide = cremi_border_mask(gt, 10, voxel_size=(40, 5, 5))  # 2 pixels
    assert wide.ravel().tolist() == [0, 1, 1, 1, 1, 1, 1, 0]
    stacked = np.array([[[1, 1]], [[2, 2]]])  # a boundary in z only is no border
    assert not cremi_border_mask(stacked, 100).any()


def test_border_mask_ignores_voxels_near_boundaries(medulla, medulla_segmentation):
    seg = medulla_segmentation
    border = cremi_border_mask(medulla, 20, voxel_size=(10, 10, 10))
    assert 0.05 < border.mean() < 0.9
    masked = evaluate_segmentation(seg, medulla, border_threshold_nm=20, voxel_size=(10, 10, 10))
    by_hand = evaluate_segmentation(seg, np.where(border, 0, medulla))
    assert masked.as_dict() == pytest.approx(by_hand.as_dict())
    # errors sit at boundaries, so ignoring them can only help here
    assert masked.voi < evaluate_segmentation(seg, medulla).voi


def test_dice_and_iou_by_hand():
    prediction = np.array([1, 1, 0, 0], dtype=bool)
    target = np.array([1, 0, 1, 0], dtype=bool)
    assert dice(prediction, target) == pytest.approx(0.5)
    assert iou(prediction, target) == pytest.approx(1 / 3)
    assert dice(target, target) == iou(target, target) == 1.0
    assert dice(np.zeros(3), np.zeros(3)) == iou(np.zeros(3), np.zeros(3)) == 1.0
    assert dice(~target, target) == iou(~target, target) == 0.0
    # scored voxels 0, 2, 3: prediction [1, 0, 0], target [1, 1, 0]
    assert dice(prediction, target, mask=np.array([1, 0, 1, 1], dtype=bool)) == pytest.approx(2 / 3)


def test_bad_input_raises_metric_errors():
    with pytest.raises(MetricError, match="shape"):
        evaluate_segmentation(np.zeros((2, 2, 2), int), np.zeros((2, 2, 3), int))
    with pytest.raises(MetricError, match="integer"):
        evaluate_segmentation(np.zeros((2, 2, 2)), np.ones((2, 2, 2), int))
    with pytest.raises(MetricError, match="no labelled voxel"):
        evaluate_segmentation(np.ones((2, 2, 2), int), np.zeros((2, 2, 2), int))
    with pytest.raises(RegistryError, match="did you mean 'pairs'"):
        evaluate_segmentation(np.ones((2, 2, 2), int), np.ones((2, 2, 2), int), convention="pair")
