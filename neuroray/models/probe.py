"""Frozen-encoder linear probes: how much of a voxel target an encoder's tokens already hold.

A pretraining is judged by what its encoder knows before any fine-tuning: the probe keeps the
encoder frozen and fits one linear map per token, from its feature vector to the target's
voxels inside that token's patch (the pixel-shuffle head of MAE's decoder, without the decoder).
Whatever the probe gets right is linearly readable from the features; nothing else can help it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from neuroray.models.vit3d import ViT3D, unpatchify


@torch.no_grad()
def token_features(encoder: ViT3D, images: Tensor, batch_size: int = 8) -> Tensor:
    """Final tokens ``[B, N, D]`` of ``images [B, C, z, y, x]`` through the frozen encoder."""
    encoder.eval()
    parts = [
        encoder.forward_features(images[i : i + batch_size]).tokens
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(parts)


class LinearProbe(nn.Module):
    """One linear map per token: ``D`` features -> the target's voxels in the token's patch."""

    def __init__(self, width: int, patch_size: Sequence[int], channels: int) -> None:
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.channels = channels
        self.head = nn.Linear(width, channels * int(np.prod(patch_size)))

    def forward(self, tokens: Tensor, grid: Sequence[int]) -> Tensor:
        """Logits ``[B, channels, z, y, x]`` from tokens ``[B, N, D]`` on ``grid``."""
        return unpatchify(self.head(tokens), grid, self.patch_size)


def fit_probe(
    features: Tensor,
    targets: Tensor,
    grid: Sequence[int],
    patch_size: Sequence[int],
    *,
    steps: int = 300,
    lr: float = 1e-2,
    batch_size: int = 32,
    seed: int = 0,
) -> LinearProbe:
    """A :class:`LinearProbe` fitted by class-balanced BCE to binary ``targets [B, C, z, y, x]``."""
    torch.manual_seed(seed)
    probe = LinearProbe(features.shape[-1], patch_size, targets.shape[1])
    optimiser = torch.optim.Adam(probe.parameters(), lr=lr)
    positive = float(targets.mean().clamp(1e-6, 1 - 1e-6))
    pos_weight = torch.tensor((1 - positive) / positive)  # balanced: rare boundaries count
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pick = torch.randint(len(features), (min(batch_size, len(features)),), generator=generator)
        logits = probe(features[pick], grid)
        loss = nn.functional.binary_cross_entropy_with_logits(
            logits, targets[pick], pos_weight=pos_weight
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return probe.eval()


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision-recall curve as a step function (scikit-learn's definition)."""
    scores, labels = np.ravel(scores), np.ravel(labels).astype(bool)
    if not labels.any():
        raise ValueError("average precision needs at least one positive label")
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # thresholds
    true_pos = np.cumsum(labels)[last_of_tie]
    precision = true_pos / (last_of_tie + 1)
    recall = true_pos / labels.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
