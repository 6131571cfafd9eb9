"""One home for the layers tests write to disk: an array as a layer (:func:`write_layer`), and
the affinity layer that segmentation tests segment (:func:`write_affinity_layer`: a label
volume's nearest-neighbour affinities, optionally noisy, as uint8 precomputed — what a fine-tuned
model's prediction looks like on disk).

Tests import it as ``from written_layers import ...`` (tests/ is on the path through
tests/conftest.py); tests/multinode_scenarios.py, run as a script from tests/, too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from neuroray.platform.volume import create_volume
from neuroray.segmentation.targets import seg_to_affinities


def write_layer(url: str | os.PathLike, array: np.ndarray, **create: Any) -> str:
    """``array`` [z, y, x] written as a new layer at ``url`` (``create``: create_volume's options,
    e.g. chunk_shape, voxel_size, layer_type, format); returns the URL as a string."""
    layer = create_volume(url, shape=array.shape, dtype=array.dtype, **create)
    layer.write(layer.bounds, array)
    return os.fspath(url)


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
