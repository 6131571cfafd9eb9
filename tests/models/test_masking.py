"""Maskers: exact ratios, shapes, determinism, tube and block structure, the policy hook."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import BaseModel
from scipy import ndimage

from neuroray.config import StrictModel, from_json, to_json
from neuroray.errors import ConfigError, RegistryError
from neuroray.masking import (
    MASKERS,
    BlockMasker,
    MaskerSpec,
    MaskingError,
    PolicyMasker,
    RandomMasker,
    build_masker,
    mask_ratio,
    masked_count,
)

GRID = (4, 8, 10, 10)  # the EM default: 32x160x160 crops, 4x16x16 patches


@pytest.mark.parametrize("name", MASKERS.names())
def test_every_masker_gives_bool_masks_with_both_kinds_of_token(name):
    for ratio, grid in [
        (0.75, GRID),
        (0.01, (3, 1, 2, 2)),
        (0.99, (3, 2, 2, 2)),
        (0.5, (2, 3, 5, 7)),
    ]:
        mask = build_masker(name, ratio=ratio).mask(grid, np.random.default_rng(0))
        assert mask.dtype == bool and mask.shape == grid
        flat = mask.reshape(grid[0], -1)
        assert flat.any(1).all() and (~flat).any(1).all()


@pytest.mark.parametrize("name", MASKERS.names())
def test_every_masker_is_deterministic_under_a_seed(name):
    masker = build_masker(name, ratio=0.6)
    first = masker.mask(GRID, np.random.default_rng(7))
    assert np.array_equal(first, masker.mask(GRID, np.random.default_rng(7)))
    assert not np.array_equal(first, masker.mask(GRID, np.random.default_rng(8)))


@pytest.mark.parametrize("name", MASKERS.names())
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.85])
def test_exact_ratio_per_sample(name, ratio):
    mask = build_masker(name, ratio=ratio).mask(GRID, np.random.default_rng(1))
    np.testing.assert_array_equal(mask_ratio(mask), np.full(GRID[0], ratio))


def test_masked_count_rounds_and_clamps():
    assert masked_count(0.75, 800) == 600
    assert masked_count(0.001, 800) == 1
    assert masked_count(0.9999, 800) == 799


def test_random_masks_cover_tokens_uniformly():
    mask = RandomMasker(ratio=0.25).mask((2000, 1, 2, 4), np.random.default_rng(0))
    frequency = mask.mean(0).ravel()
    assert np.abs(frequency - 0.25).max() < 0.04


def test_tube_masks_are_constant_along_z():
    mask = build_masker("tube", ratio=0.7).mask(GRID, np.random.default_rng(2))
    assert (mask == mask[:, :1]).all()
    assert not (mask == mask[:, :, :1]).all()  # but vary over y


def test_block_masks_are_contiguous_cuboids():
    masker = BlockMasker(ratio=0.5, min_block=(1, 2, 2), max_block=(3, 4, 4))
    mask = masker.mask((8, 8, 10, 10), np.random.default_rng(3))
    for sample in mask:
        labels, count = ndimage.label(sample)  # 6-connected regions
        sizes = np.bincount(labels.ravel())[1:]
        assert count >= 1 and sizes.min() >= 4  # each region holds a whole >= 1x2x2 block
    # the property has teeth: random masks at the same ratio break it
    random = RandomMasker(ratio=0.5).mask((8, 8, 10, 10), np.random.default_rng(3))
    assert min(np.bincount(ndimage.label(s)[0].ravel())[1:].min() for s in random) < 4


def test_policy_masker_masks_at_random_until_a_source_is_set():
    masker = PolicyMasker(ratio=0.8)
    assert not masker.has_source
    np.testing.assert_array_equal(mask_ratio(masker.mask(GRID, np.random.default_rng(0))), 0.8)


def test_policy_masker_samples_from_source_probabilities():
    masker = build_masker("policy", ratio=0.5)
    probs = np.zeros(GRID)
    probs[:, :4] = 1.0  # mask the first half in z for sure, never the second half
    probs[:, 4:, 0, 0] = 0.5
    calls = []

    def policy(grid, rng):
        calls.append(grid)
        return probs

    masker.set_source(policy)
    masks = np.stack([masker.mask(GRID, np.random.default_rng(s)) for s in range(40)])
    assert calls[0] == GRID
    assert masks[:, :, :4].all() and not masks[:, :, 4:, 1:].any()
    assert 0.3 < masks[:, :, 4:, 0, 0].mean() < 0.7
    masker.set_source(None)
    np.testing.assert_array_equal(mask_ratio(masker.mask(GRID, np.random.default_rng(0))), 0.5)


def test_policy_masker_keeps_one_visible_and_one_masked_token():
    masker = PolicyMasker()
    masker.set_source(lambda grid, rng: np.ones(grid, dtype=bool))
    assert (mask_ratio(masker.mask(GRID, np.random.default_rng(0))) == 1 - 1 / 800).all()
    low = np.zeros(GRID)
    low[:, 3, 4, 5] = 1e-3  # the most maskable token is the one fixed up to masked
    masker.set_source(lambda grid, rng: low)
    mask = masker.mask(GRID, np.random.default_rng(0))
    assert mask.sum() == GRID[0] and mask[:, 3, 4, 5].all()


def test_policy_masker_rejects_bad_sources():
    masker = PolicyMasker()
    masker.set_source(lambda grid, rng: np.zeros((1, 2, 3)))
    with pytest.raises(MaskingError, match="shape"):
        masker.mask(GRID, np.random.default_rng(0))
    masker.set_source(lambda grid, rng: np.full(grid, 1.5))
    with pytest.raises(MaskingError, match=r"outside \[0, 1\]"):
        masker.mask(GRID, np.random.default_rng(0))
    with pytest.raises(MaskingError, match="callable"):
        masker.set_source("not a policy")


def test_bad_grids_and_names_are_actionable_errors():
    with pytest.raises(MaskingError, match="fewer than 2 tokens"):
        RandomMasker().mask((2, 1, 1, 1), np.random.default_rng(0))
    with pytest.raises(MaskingError, match="four positive sizes"):
        RandomMasker().mask((2, 8, 10), np.random.default_rng(0))
    with pytest.raises(MaskingError, match="columns"):
        build_masker("tube").mask((2, 8, 1, 1), np.random.default_rng(0))
    with pytest.raises(RegistryError, match="did you mean 'random'"):
        build_masker("randm")
    with pytest.raises(ConfigError, match="min_bock"):
        build_masker("block", min_bock=(1, 2, 2))
    with pytest.raises(ConfigError, match="ratio"):
        build_masker("random", ratio=1.5)


def test_masker_spec_is_a_yaml_friendly_config_field():
    class Job(StrictModel):
        masking: MaskerSpec = RandomMasker()

    job = Job.model_validate({"masking": {"name": "block", "ratio": 0.6, "max_block": [2, 3, 3]}})
    assert isinstance(job.masking, BlockMasker) and job.masking.max_block == (2, 3, 3)
    assert from_json(Job, to_json(job)) == job
    assert isinstance(Job().masking, BaseModel) and Job().masking.name == "random"
    with pytest.raises(ConfigError):
        from_json(Job, '{"masking": {"name": "tube", "max_block": [1, 1, 1]}}')
