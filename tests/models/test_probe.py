"""The linear probe that judges pretrained encoders (benchmarks/dbmim_quality.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuroray.models.probe import average_precision, fit_probe, token_features
from neuroray.models.vit3d import ViTConfig, build_vit3d, unpatchify


def test_average_precision_known_answers():
    # scikit-learn's documented example: 0.8333...
    assert average_precision(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == (
        pytest.approx(5 / 6)
    )
    assert average_precision(np.arange(4.0), np.array([0, 0, 1, 1])) == 1.0
    assert average_precision(-np.arange(4.0), np.array([0, 0, 0, 1])) == 0.25
    # tied scores form one threshold: precision is the positive share of the tie
    assert average_precision(np.ones(4), np.array([1, 0, 0, 0])) == 0.25
    with pytest.raises(ValueError, match="positive"):
        average_precision(np.ones(3), np.zeros(3))


def test_probe_reads_a_linearly_encoded_target_and_not_a_shuffled_one():
    rng = torch.Generator().manual_seed(0)
    grid, patch = (2, 2, 2), (2, 4, 4)
    features = torch.randn(96, 8, 16, generator=rng)
    direction = torch.randn(16, generator=rng)
    per_token = (features @ direction > 0).float()  # [B, N]: one bit per token
    voxels = per_token[..., None].expand(-1, -1, int(np.prod(patch)))
    targets = unpatchify(voxels, grid, patch)  # [B, 1, z, y, x]
    train, test = slice(0, 64), slice(64, 96)

    def held_out_ap(train_targets):
        probe = fit_probe(features[train], train_targets, grid, patch, steps=200)
        with torch.no_grad():
            scores = probe(features[test], grid)
        return average_precision(scores.numpy(), targets[test].numpy())

    base_rate = float(targets[test].mean())
    assert held_out_ap(targets[train]) > 0.95
    shuffled = targets[train][torch.randperm(64, generator=rng)]
    assert held_out_ap(shuffled) < base_rate + 0.2


def test_token_features_are_the_frozen_encoders_final_tokens():
    encoder = build_vit3d(ViTConfig(img_size=[8, 32, 32], patch_size=[4, 16, 16], width=32,
                                    depth=1, heads=2))  # fmt: skip
    images = torch.rand(5, 1, 8, 32, 32)
    features = token_features(encoder, images, batch_size=2)
    assert features.shape == (5, 8, 32) and not features.requires_grad
    torch.testing.assert_close(features[3:], encoder.forward_features(images[3:]).tokens.detach())
