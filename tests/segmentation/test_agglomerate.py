"""Fragments and agglomeration: labels -> affinities -> fragments -> waterz gives the labels back,
also where labels touch without a boundary (fib_medulla_s2, or the synthetic dense cube)."""

from __future__ import annotations

import cc3d
import numpy as np
import pytest
from scipy import ndimage

from neuroray.errors import RegistryError
from neuroray.platform.volume import open_volume
from neuroray.segmentation.agglomerate import (
    AGGLOMERATORS,
    AgglomerationError,
    agglomerate,
    boundary_map,
    fragments_from_affinities,
    split_at_cut_edges,
)
from neuroray.segmentation.metrics import evaluate_segmentation
from neuroray.segmentation.targets import LONG_RANGE_OFFSETS, seg_to_affinities

MEDULLA_CROP = np.s_[100:200, 100:200, 100:200]  # of the real fib_medulla_s2


@pytest.fixture(scope="module")
def gala(em_volume):
    """Labels with 0 between all objects: fib_gala_train, or synth_em's with boundary gaps."""
    return open_volume(em_volume.labels)[:]


@pytest.fixture(scope="module")
def medulla(em_dense):
    """Touching labels, no 0: fib_medulla_s2's 100^3 crop, or the synthetic 64 x 128 x 128 cube."""
    return open_volume(em_dense.labels)[MEDULLA_CROP if em_dense.real else np.s_[:]]


def _cut_edges(affs, fragments):
    """Pairs of fragment ids across every nearest-neighbour edge with affinity 0."""
    pairs = []
    for axis in range(3):
        a = np.moveaxis(fragments, axis, 0)
        cut = np.moveaxis(affs[axis], axis, 0)[1:] == 0
        pairs.append(np.stack([a[1:][cut], a[:-1][cut]]))
    return np.concatenate(pairs, axis=1)


def test_boundary_map_marks_both_sides_of_a_touching_boundary():
    labels = np.array([[[1, 1, 1, 2, 2, 2]]])
    affs, _ = seg_to_affinities(labels)
    # the cut is stored at the voxel of label 2 only; the map marks both neighbours
    assert affs[2, 0, 0].tolist() == [0, 1, 1, 0, 1, 1]
    assert boundary_map(affs)[0, 0].tolist() == [1, 1, 0, 0, 1, 1]


def test_fragments_respect_every_cut_edge(medulla):
    """No fragment straddles a cut: every fragment lies inside one ground-truth object."""
    affs, _ = seg_to_affinities(medulla)
    fragments = fragments_from_affinities(affs)
    pairs = _cut_edges(affs, fragments)
    labelled = (pairs != 0).all(axis=0)
    assert labelled.any() and (pairs[0][labelled] != pairs[1][labelled]).all()
    inside = fragments != 0
    overlaps = np.unique(np.stack([fragments[inside], medulla[inside]]), axis=1)
    assert len(np.unique(overlaps[0])) == overlaps.shape[1]  # one object per fragment


def test_mean_affinity_fragments_merge_the_touching_medulla_cube(medulla):
    """The failure the edge-respecting fragments prevent: thresholding the mean of the three
    channels leaves one-sided cuts, so the whole crop floods into very few objects."""
    affs, _ = seg_to_affinities(medulla)
    naive, _ = ndimage.label(affs.mean(axis=0) > 0.5)
    merged = agglomerate(affs, [0.5], fragments=naive.astype(np.uint64))[0.5]
    assert evaluate_segmentation(merged, medulla).voi_merge > 0.5
    # without the split at cut edges, thin processes (no inside voxel) flood into neighbours
    flooded = fragments_from_affinities(affs, respect_edges=False)
    flooded_segmentation = agglomerate(affs, [0.5], fragments=flooded)[0.5]
    assert evaluate_segmentation(flooded_segmentation, medulla).voi_merge > 0.1


@pytest.mark.parametrize("method", AGGLOMERATORS.names())
@pytest.mark.parametrize("volume", ["gala", "medulla"])
def test_round_trip_reproduces_the_labels(volume, method, request):
    labels = request.getfixturevalue(volume)
    affs, _ = seg_to_affinities(labels)
    segmentation = agglomerate(affs, [0.5], method=method)[0.5]
    assert segmentation.dtype == np.uint64 and segmentation.shape == labels.shape
    assert segmentation.all()  # every voxel has a segment
    # objects cut into pieces by the crop cannot be told apart from separate objects
    pieces = cc3d.connected_components(labels, connectivity=6)
    exact = evaluate_segmentation(segmentation, pieces)
    assert exact.voi < 0.005 and exact.arand < 0.001
    scores = evaluate_segmentation(segmentation, labels)
    assert scores.voi_merge < 0.005 and scores.voi_split < 0.05


def test_per_slice_fragments_stay_in_their_section_and_round_trip(gala):
    affs, _ = seg_to_affinities(gala)
    fragments = fragments_from_affinities(affs, per_slice=True)
    ids_per_section = [set(np.unique(section)) - {0} for section in fragments]
    assert sum(map(len, ids_per_section)) == len(set().union(*ids_per_section))
    segmentation = agglomerate(affs, [0.5], fragments=fragments)[0.5]
    assert evaluate_segmentation(segmentation, gala).voi < 0.005


def test_threshold_sweep_merges_monotonically(gala):
    rng = np.random.default_rng(0)
    affs, _ = seg_to_affinities(gala[:, :50, :100], LONG_RANGE_OFFSETS)
    noisy = np.clip(affs + rng.normal(0, 0.3, affs.shape), 0, 1).astype(np.float32)
    fragments = fragments_from_affinities(noisy, LONG_RANGE_OFFSETS)
    thresholds = [0.9, 0.0, 0.3, 0.6]
    sweep = agglomerate(noisy, thresholds, offsets=LONG_RANGE_OFFSETS, fragments=fragments)
    assert list(sweep) == sorted(thresholds)
    counts = [len(np.unique(s)) for s in sweep.values()]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    # nothing scores below 0: the lowest threshold returns the fragments, 0 filled in
    first = sweep[0.0]
    assigned = fragments != 0
    relabel = np.unique(np.stack([fragments[assigned], first[assigned]]), axis=1)
    assert len(np.unique(relabel[0])) == len(np.unique(relabel[1])) == relabel.shape[1]


def test_split_at_cut_edges_leaves_unlinked_voxels_to_the_fill():
    labels = np.array([[[1, 1, 0, 2, 2]]])
    affs, _ = seg_to_affinities(labels)
    one_fragment = np.ones(labels.shape, np.uint64)
    parts = split_at_cut_edges(one_fragment, affs)
    assert parts[0, 0].tolist() == [1, 1, 0, 2, 2]
    filled = agglomerate(affs, [0.5], fragments=parts)[0.5]
    assert filled.all() and len(np.unique(filled)) == 2
    kept = agglomerate(affs, [0.5], fragments=parts, fill_unassigned=False)[0.5]
    assert kept[0, 0, 2] == 0


def test_scoring_function_is_a_parameter(medulla):
    affs, _ = seg_to_affinities(medulla[:40, :40, :40])
    mean = "OneMinus<MeanAffinity<RegionGraphType, ScoreValue>>"
    segmentation = agglomerate(affs, [0.5], scoring_function=mean)[0.5]
    assert evaluate_segmentation(segmentation, medulla[:40, :40, :40]).voi_merge < 0.005


def test_waterz_log_is_silenced_unless_asked_for(capfd):
    affs, _ = seg_to_affinities(np.array([[[1, 1, 2, 2]]] * 2))
    agglomerate(affs, [0.5])
    assert "threshold" not in capfd.readouterr().out
    agglomerate(affs, [0.5], quiet=False)
    assert "merging until threshold" in capfd.readouterr().out


def test_bad_input_raises_helpful_errors():
    affs, _ = seg_to_affinities(np.ones((2, 3, 4), int))
    with pytest.raises(RegistryError, match="did you mean 'waterz'"):
        agglomerate(affs, [0.5], method="waterzz")
    with pytest.raises(AgglomerationError, match="channels"):
        agglomerate(affs, [0.5], offsets=LONG_RANGE_OFFSETS)
    with pytest.raises(AgglomerationError, match="nearest-neighbour"):
        agglomerate(affs[:2], [0.5], offsets=[(1, 0, 0), (0, 1, 0)])
    with pytest.raises(AgglomerationError, match="thresholds"):
        agglomerate(affs, [])
    with pytest.raises(AgglomerationError, match="fragments"):
        agglomerate(affs, [0.5], fragments=np.ones((2, 3, 5), np.uint64))
