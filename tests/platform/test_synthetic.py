"""Synthetic EM and LM data: deterministic, dense, consistent labels, bright LM fibres."""

from __future__ import annotations

import inspect

import cc3d
import numpy as np
import pytest
from scipy import ndimage as ndi

from neuroray.errors import ConfigError
from neuroray.platform.swc import rasterize
from neuroray.platform.synthetic import (
    SynthEM,
    SynthEMConfig,
    SynthLM,
    SynthLMConfig,
    synth_em,
    synth_lm,
)

EM_SHAPE = (16, 96, 96)
LM_SHAPE = (24, 96, 96)


@pytest.fixture(scope="module")
def em() -> SynthEM:
    return synth_em((24, 128, 128), seed=5)


@pytest.fixture(scope="module")
def lm() -> SynthLM:
    return synth_lm((32, 160, 160), seed=5)


def em_arrays(volume: SynthEM) -> dict[str, np.ndarray]:
    return {k: getattr(volume, k) for k in ("raw", "labels", "mito", "membrane")}


def lm_arrays(volume: SynthLM) -> dict[str, np.ndarray]:
    return {"image": volume.image, "mask": volume.mask, "xyz": volume.tree.xyz}


# --------------------------------------------------------------------------- EM
def test_em_shapes_and_dtypes(em):
    assert em.raw.shape == em.labels.shape == em.mito.shape == em.membrane.shape == (24, 128, 128)
    assert (em.raw.dtype, em.labels.dtype, em.mito.dtype, em.membrane.dtype) == (
        np.uint8,
        np.uint32,
        bool,
        bool,
    )
    assert em.voxel_size == (40.0, 8.0, 8.0)
    assert em.missing_sections == () and em.misalignments == ()


def test_em_is_deterministic_under_a_seed_and_seeds_differ():
    kwargs = dict(missing_sections=1, misaligned_sections=1, boundary_gap=True)
    first, second = synth_em(EM_SHAPE, 11, **kwargs), synth_em(EM_SHAPE, 11, **kwargs)
    for name, array in em_arrays(first).items():
        assert np.array_equal(array, em_arrays(second)[name]), name
    assert first.missing_sections == second.missing_sections
    assert first.misalignments == second.misalignments
    other = synth_em(EM_SHAPE, 12, **kwargs)
    assert not np.array_equal(first.raw, other.raw)
    assert not np.array_equal(first.labels, other.labels)


def test_em_labels_are_dense_consecutive_and_connected(em):
    labels = em.labels
    assert labels.min() == 1  # every voxel belongs to a neuron (no boundary gap by default)
    n = int(labels.max())
    assert n >= 10
    np.testing.assert_array_equal(np.unique(labels), np.arange(1, n + 1))
    assert cc3d.connected_components(labels, connectivity=6).max() == n  # one piece per id
    assert np.bincount(labels.ravel())[1:].min() >= 64  # no crumbs


def touching_pairs(labels: np.ndarray, membrane: np.ndarray, axis: int):
    """Membrane flags of the two voxels of every face-neighbour pair with different ids."""
    a, m = np.moveaxis(labels, axis, 0), np.moveaxis(membrane, axis, 0)
    differs = a[1:] != a[:-1]
    return m[:-1][differs], m[1:][differs]


def test_em_membranes_separate_every_pair_of_touching_ids(em):
    labels, membrane = em.labels, em.membrane
    for axis in (1, 2):  # in a section: both sides of the contact are membrane
        lower, upper = touching_pairs(labels, membrane, axis)
        assert lower.size and lower.all() and upper.all()
    lower, upper = touching_pairs(labels, membrane, 0)  # across sections: at least one side
    assert lower.size and (lower | upper).all()
    # and they are dark in the image
    cytoplasm = ~membrane & ~em.mito
    assert em.raw[membrane].mean() < em.raw[cytoplasm].mean() - 40
    assert 0.05 < membrane.mean() < 0.5


def test_em_boundary_gap_puts_zero_exactly_on_membranes():
    gapped = synth_em(EM_SHAPE, 3, boundary_gap=True)
    assert np.array_equal(gapped.labels == 0, gapped.membrane)
    for axis in range(3):  # no two face neighbours carry different non-zero ids
        a = np.moveaxis(gapped.labels, axis, 0)
        assert not ((a[1:] != a[:-1]) & (a[1:] > 0) & (a[:-1] > 0)).any()
    n = int(gapped.labels.max())
    np.testing.assert_array_equal(np.unique(gapped.labels), np.arange(0, n + 1))


def test_em_mitochondria_lie_inside_single_neurites_and_are_dark(em):
    mito = em.mito
    assert 0.001 < mito.mean() < 0.1
    assert not (mito & em.membrane).any()
    pieces = cc3d.connected_components(mito, connectivity=6)
    n = int(pieces.max())
    assert n >= 3
    ids_per_piece = {int(p): set() for p in range(1, n + 1)}
    for piece, label in zip(pieces[mito], em.labels[mito], strict=True):
        ids_per_piece[int(piece)].add(int(label))
    assert all(len(ids) == 1 for ids in ids_per_piece.values())
    cytoplasm = ~em.membrane & ~mito
    assert em.raw[mito].mean() < em.raw[cytoplasm].mean() - 30


def test_em_artefacts_change_only_what_they_say():
    clean = synth_em(EM_SHAPE, 7)
    holes = synth_em(EM_SHAPE, 7, missing_sections=2)
    assert len(holes.missing_sections) == 2
    assert np.array_equal(holes.labels, clean.labels)
    kept = np.setdiff1d(np.arange(EM_SHAPE[0]), holes.missing_sections)
    assert np.array_equal(holes.raw[kept], clean.raw[kept])
    assert not holes.raw[list(holes.missing_sections)].any()

    shifted = synth_em(EM_SHAPE, 7, misaligned_sections=1, max_misalignment_px=5)
    ((z, dy, dx),) = shifted.misalignments
    assert z >= 1 and z < EM_SHAPE[0] and max(abs(dy), abs(dx)) <= 5
    assert np.array_equal(shifted.raw[:z], clean.raw[:z])
    for name in ("raw", "labels"):
        moved = getattr(shifted, name)[z:, 5 + dy : 91 + dy, 5 + dx : 91 + dx]
        assert np.array_equal(moved, getattr(clean, name)[z:, 5:91, 5:91]), name


def test_em_anisotropy_is_physical():
    """Same physical field of view: an isotropic volume sampled 5x finer in z has as many objects."""
    coarse = synth_em((8, 64, 64), 2, voxel_size=(40.0, 8.0, 8.0))
    fine = synth_em((40, 64, 64), 2, voxel_size=(8.0, 8.0, 8.0))
    assert 0.5 < fine.labels.max() / coarse.labels.max() < 2.0


# --------------------------------------------------------------------------- LM
def test_lm_shapes_dtypes_and_tree_in_voxel_coordinates(lm):
    assert lm.image.shape == lm.mask.shape == (32, 160, 160)
    assert lm.image.dtype == np.uint8 and lm.mask.dtype == bool
    assert lm.voxel_size == (1000.0, 330.0, 330.0)
    assert len(lm.tree) > 20 and len(lm.tree.roots) == 1
    assert (lm.tree.n_children() > 1).sum() >= 2  # it branches
    voxel = np.rint(lm.tree.zyx).astype(int)
    assert np.all((voxel >= 0) & (voxel < lm.image.shape))
    assert lm.mask[tuple(voxel.T)].all()
    assert np.array_equal(lm.mask, rasterize(lm.tree, lm.image.shape, lm.voxel_size))


def test_lm_fibres_are_far_brighter_than_a_near_zero_background(lm):
    near = ndi.maximum_filter(lm.mask, size=(3, 9, 9))
    background = lm.image[~near]
    assert lm.image[lm.mask].mean() > 10 * background.mean()
    assert lm.image[lm.mask].mean() > 60
    assert np.median(background) == 0 and background.mean() < 1.0


def test_lm_is_deterministic_under_a_seed_and_seeds_differ():
    first, second = synth_lm(LM_SHAPE, 4), synth_lm(LM_SHAPE, 4)
    for name, array in lm_arrays(first).items():
        assert np.array_equal(array, lm_arrays(second)[name]), name
    other = synth_lm(LM_SHAPE, 5)
    assert not np.array_equal(first.image, other.image)
    assert not np.array_equal(first.mask, other.mask)


def test_lm_psf_is_elongated_in_z():
    sharp = synth_lm(LM_SHAPE, 1, psf_sigma_nm=(1.0, 1.0, 1.0), read_noise=0.0, background=0.0)
    blurred = synth_lm(LM_SHAPE, 1, psf_sigma_nm=(2000.0, 1.0, 1.0), read_noise=0.0, background=0.0)
    assert np.array_equal(sharp.mask, blurred.mask)
    lit_z = lambda v: (v.image > 10).any(axis=(1, 2)).sum()  # noqa: E731
    lit_xy = lambda v: (v.image > 10).any(axis=0).sum()  # noqa: E731
    assert lit_z(blurred) > lit_z(sharp)
    assert lit_xy(blurred) <= lit_xy(sharp) * 1.1


# --------------------------------------------------------------------------- configs and errors
@pytest.mark.parametrize(
    ("config", "function"), [(SynthEMConfig, synth_em), (SynthLMConfig, synth_lm)]
)
def test_config_fields_are_exactly_the_keyword_arguments(config, function):
    parameters = inspect.signature(function).parameters
    assert list(config.model_fields) == list(parameters)
    for name, field in config.model_fields.items():
        assert tuple(np.atleast_1d(field.default)) == tuple(
            np.atleast_1d(parameters[name].default)
        ), name


def test_config_drives_the_generator():
    config = SynthEMConfig(shape=(8, 64, 64), seed=9, missing_sections=1)
    via_config = synth_em(**config.model_dump())
    direct = synth_em((8, 64, 64), 9, missing_sections=1)
    assert np.array_equal(via_config.raw, direct.raw)
    with pytest.raises(ValueError):
        SynthLMConfig(brightness=1000)


@pytest.mark.parametrize(
    "call",
    [
        lambda: synth_em((16, 64)),
        lambda: synth_em(EM_SHAPE, radius_nm=(200.0, 50.0)),
        lambda: synth_em((4, 64, 64), missing_sections=5),
        lambda: synth_em(EM_SHAPE, voxel_size=(0.0, 8.0, 8.0)),
        lambda: synth_lm(LM_SHAPE, radius_px=(0.0, 2.0)),
    ],
)
def test_bad_arguments_raise_config_errors(call):
    with pytest.raises(ConfigError):
        call()


def test_rewriting_the_same_synthetic_files_keeps_them_untouched(tmp_path):
    """A demo rerun writes its sources again: unchanged files keep their modification time, so
    layers ingested from them still match their fingerprints; another seed rewrites them."""
    import os

    def stamps() -> dict[str, int]:
        return {p.name: os.stat(p).st_mtime_ns for p in sorted(tmp_path.iterdir())}

    from neuroray.platform.synthetic import write_synthetic

    for kind, shape in (("em", (16, 64, 64)), ("lm", (16, 64, 64))):
        write_synthetic(kind, tmp_path, shape=shape, seed=0)
    first = stamps()
    for kind, shape in (("em", (16, 64, 64)), ("lm", (16, 64, 64))):
        write_synthetic(kind, tmp_path, shape=shape, seed=0)
    assert stamps() == first and len(first) == 3
    write_synthetic("em", tmp_path, shape=(16, 64, 64), seed=1)
    assert stamps()["synth_em.h5"] != first["synth_em.h5"]
