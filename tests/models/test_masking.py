"""Maskers: exact ratios, shapes, determinism, tube and block structure, the policy hook and
its two rules (fixed count with nominations, emergent count)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import BaseModel
from scipy import ndimage

from neuroray.config import StrictModel, from_json, to_json
from neuroray.errors import ConfigError, RegistryError
from neuroray.masking import (
    MASKERS,
    AlphaSchedule,
    BlockMasker,
    MaskerSpec,
    MaskingError,
    PolicyMasker,
    RandomMasker,
    build_masker,
    mask_ratio,
    masked_count,
    nominated_mask,
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


def test_policy_masker_emergent_rule_samples_the_mask_from_source_probabilities():
    masker = build_masker("policy", ratio=0.5)
    probs = np.zeros(GRID)
    probs[:, :4] = 1.0  # mask the first half in z for sure, never the second half
    probs[:, 4:, 0, 0] = 0.5
    calls = []

    def policy(grid, rng):
        calls.append(grid)
        return probs

    masker.set_source(policy, count="emergent")
    masks = np.stack([masker.mask(GRID, np.random.default_rng(s)) for s in range(40)])
    assert calls[0] == GRID
    assert masks[:, :, :4].all() and not masks[:, :, 4:, 1:].any()
    assert 0.3 < masks[:, :, 4:, 0, 0].mean() < 0.7
    masker.set_source(None)
    np.testing.assert_array_equal(mask_ratio(masker.mask(GRID, np.random.default_rng(0))), 0.5)


def test_policy_masker_emergent_rule_keeps_one_visible_and_one_masked_token():
    masker = PolicyMasker()
    masker.set_source(lambda grid, rng: np.ones(grid, dtype=bool), count="emergent")
    assert (mask_ratio(masker.mask(GRID, np.random.default_rng(0))) == 1 - 1 / 800).all()
    low = np.zeros(GRID)
    low[:, 3, 4, 5] = 1e-3  # the most maskable token is the one fixed up to masked
    masker.set_source(lambda grid, rng: low, count="emergent")
    mask = masker.mask(GRID, np.random.default_rng(0))
    assert mask.sum() == GRID[0] and mask[:, 3, 4, 5].all()


# ---------------------------------------------------------------------- fixed count
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("share", [0.0, 0.05, 0.5, 1.0])
def test_nominated_mask_masks_exactly_k_and_honours_round_alpha_k_nominations(alpha, share):
    rng = np.random.default_rng(int(alpha * 10 + share * 100))
    n, k = 64, 48
    nominations = rng.random((50, n)) < share
    mask, drawn = nominated_mask(nominations, k, alpha, rng)
    assert mask.dtype == bool and mask.shape == nominations.shape
    assert (mask.sum(1) == k).all()  # the count never depends on the nominations
    assert not (drawn & ~mask).any() and not (drawn & ~nominations).any()
    chosen = round(alpha * k)
    # round(alpha K) drawn from the nominees (all of them when there are fewer)
    np.testing.assert_array_equal(drawn.sum(1), np.minimum(chosen, nominations.sum(1)))
    assert ((mask & nominations).sum(1) >= np.minimum(chosen, nominations.sum(1))).all()


def test_nominated_mask_draws_the_rest_uniformly_so_every_token_can_be_masked():
    rng = np.random.default_rng(0)
    n, k, alpha = 32, 24, 0.5
    nominations = np.zeros((4000, n), bool)
    nominations[:, :16] = True  # the first half nominated every time
    mask, drawn = nominated_mask(nominations, k, alpha, rng)
    # 12 from the 16 nominees, then 12 of the 20 left at random: P = 12/16 + 4/16 * 12/20 = 0.9
    np.testing.assert_allclose(mask[:, :16].mean(), 0.9, atol=0.01)
    np.testing.assert_allclose(mask[:, 16:].mean(), 12 / 20, atol=0.01)
    np.testing.assert_allclose(drawn.sum(1), 12)
    # alpha 0: nominations change nothing
    uniform, none = nominated_mask(nominations, k, 0.0, rng)
    np.testing.assert_allclose(uniform.mean(0), k / n, atol=0.03)
    assert not none.any()


def test_alpha_schedule_endpoints_and_ramp():
    schedule = AlphaSchedule()  # 0 -> 0.5 over the whole run (hard-patches mining)
    assert schedule.at(0, 100) == 0.0 and schedule.at(100, 100) == 0.5
    assert schedule.at(50, 100) == pytest.approx(0.25)
    assert schedule.at(500, 100) == 0.5 and schedule.at(7, None) == 0.0
    early = AlphaSchedule(start=0.1, end=0.4, ramp=0.5)
    assert early.at(0, 100) == pytest.approx(0.1) and early.at(25, 100) == pytest.approx(0.25)
    assert early.at(50, 100) == pytest.approx(0.4) and early.at(90, 100) == pytest.approx(0.4)
    assert AlphaSchedule(ramp=0).at(0, 100) == 0.5
    with pytest.raises(ValueError):
        AlphaSchedule(end=1.5)


def test_policy_masker_fixed_rule_masks_exactly_k_whatever_the_policy_says():
    masker = PolicyMasker(ratio=0.75)
    k = masked_count(0.75, 800)
    for probs, alpha in [(0.01, 0.5), (0.99, 0.5), (0.5, 0.0), (0.99, 1.0)]:
        masker.set_source(lambda grid, rng, p=probs: np.full(grid, p), alpha=alpha)
        mask = masker.mask(GRID, np.random.default_rng(1))
        assert (mask.reshape(GRID[0], -1).sum(1) == k).all()
        stats = masker.last_stats
        assert stats["alpha"] == alpha and stats["nominated"] == pytest.approx(probs, abs=0.03)
        # the nominees supply round(alpha K) of the K (fewer only when too few were nominated)
        expected = min(round(alpha * k), probs * 800) / k
        assert stats["from_nominations"] == pytest.approx(expected, abs=0.03)
    # a bool source gives the nominations as they are: the nominees fill their share
    nominated = np.zeros(GRID, bool)
    nominated[:, :4] = True  # 400 of 800
    masker.set_source(lambda grid, rng: nominated, alpha=0.5)
    mask = masker.mask(GRID, np.random.default_rng(2))
    assert (mask.reshape(GRID[0], -1).sum(1) == k).all()
    assert (mask[:, :4].reshape(GRID[0], -1).sum(1) >= round(0.5 * k)).all()


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
    with pytest.raises(MaskingError, match="alpha"):
        masker.set_source(lambda grid, rng: np.zeros(grid), alpha=1.5)
    with pytest.raises(MaskingError, match="count"):
        masker.set_source(lambda grid, rng: np.zeros(grid), count="more")


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
