"""Placement diagnostics: they tell a policy that learned *where* from one that learned *how much*
or only *where in the grid*."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from neuroray.agents.diagnostics import partial_correlation, placement_diagnostics, spearman

B, N = 8, 64


@pytest.fixture()
def probe():
    rng = np.random.default_rng(0)
    losses = rng.gamma(2.0, size=(B, N))
    masks = np.zeros((B, N), bool)
    for c in range(B):
        masks[c, rng.permutation(N)[:48]] = True
    energy = losses + rng.normal(0, 0.5, (B, N))  # a heuristic that tracks the loss, noisily
    return losses, masks, energy


def test_spearman_matches_scipy_and_is_undefined_for_constants():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=50), rng.normal(size=50)
    y[:5] = y[5]  # ties
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert np.isnan(spearman(np.ones(5), x[:5]))
    assert partial_correlation(0.5, 0.0, 0.0) == 0.5
    assert partial_correlation(0.5, 0.5, 1.0) != partial_correlation(0.5, 0.5, 1.0)  # NaN


def test_a_content_policy_scores_high_on_loss_and_low_on_position(probe):
    losses, masks, energy = probe
    probs = 1 / (1 + np.exp(-(losses - losses.mean())))  # monotone in each patch's loss
    d = placement_diagnostics(probs, losses, masks, energy)
    assert d["within_crop_sd"] > 0.1
    assert d["spearman_heldout_loss"] == pytest.approx(1.0)
    assert d["partial_heldout_loss"] > 0.95
    assert d["spearman_gradient_energy"] > 0.5
    assert abs(d["spearman_position"]) < 0.3


def test_a_collapsed_policy_has_no_spread_and_no_order(probe):
    losses, masks, energy = probe
    d = placement_diagnostics(np.full((B, N), 0.95), losses, masks, energy)
    assert d == pytest.approx(
        {
            "within_crop_sd": 0.0,
            "spearman_heldout_loss": 0.0,
            "spearman_gradient_energy": 0.0,
            "spearman_position": 0.0,
            "partial_heldout_loss": 0.0,
        },
        abs=1e-12,
    )


def test_a_position_only_policy_is_explained_by_position(probe):
    losses, masks, energy = probe
    probs = np.tile(np.linspace(0.1, 0.9, N), (B, 1))  # the same map over every crop
    d = placement_diagnostics(probs, losses, masks, energy)
    assert d["within_crop_sd"] > 0.1  # spread alone does not prove content
    assert d["spearman_position"] == pytest.approx(1.0)
    assert abs(d["spearman_heldout_loss"]) < 0.3
    with pytest.raises(ValueError, match="2 probe crops"):
        placement_diagnostics(probs[:1], losses[:1], masks[:1], energy[:1])
