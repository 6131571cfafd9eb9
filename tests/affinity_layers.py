"""One home for the affinity layers that segmentation tests segment: a label volume's
nearest-neighbour affinities (optionally with Gaussian noise) written as a uint8 precomputed
layer, which is what a fine-tuned model's prediction looks like on disk.

Tests import it as ``from affinity_layers import write_affinity_layer`` (tests/ is on the path
through tests/conftest.py); tests/multinode_scenarios.py, run as a script from tests/, too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from neuroray.platform.volume import create_volume
from neuroray.segmentation.targets import seg_to_affinities


def write_affinity_layer(
    url: str,
    labels: np.ndarray,
    *,
    noise: float = 0.0,
    seed: int = 0,
    chunk_shape: Sequence[int] = (32, 64, 64),
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
) -> str:
    """Write ``labels``' affinities (plus N(0, ``noise``), clipped to [0, 1]) at ``url``."""
    affs, _ = seg_to_affinities(labels.astype(np.uint64))
    if noise:
        affs = np.clip(affs + np.random.default_rng(seed).normal(0, noise, affs.shape), 0, 1)
    layer = create_volume(
        url,
        shape=labels.shape,
        dtype="uint8",
        num_channels=3,
        chunk_shape=tuple(chunk_shape),
        voxel_size=tuple(voxel_size),
        format="precomputed",
    )
    layer.write(layer.bounds, np.rint(affs * 255).astype(np.uint8))
    return url
