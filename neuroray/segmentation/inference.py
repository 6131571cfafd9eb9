"""Sliding-window prediction with blended overlaps, and from probabilities to segmentations.

Shared by fine-tuning's validation, ``neuroray segment`` (blockwise, on Ray) and the quality
benchmarks, so that every number is produced by the same code path.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Literal

import cc3d
import numpy as np
import torch
from torch import nn

from neuroray.segmentation.agglomerate import agglomerate, fragments_from_affinities

Task = Literal["em", "mito", "lm"]


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window origins covering [0, size): regular steps, the last one flush with the end."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window, stride))
    return [*starts, size - window]


def blend_weights(window: Sequence[int], floor: float = 1e-3) -> np.ndarray:
    """Separable cosine (Hann-like) weights, so overlapping windows fade into each other."""
    axes = []
    for n in window:
        ramp = np.sin(np.pi * (np.arange(n) + 0.5) / n) ** 2 if n > 1 else np.ones(1)
        axes.append(np.maximum(ramp, floor))
    return (axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]).astype(
        np.float32
    )


@torch.no_grad()
def predict_array(
    model: nn.Module,
    image: np.ndarray,
    window: Sequence[int],
    *,
    overlap: Sequence[int] | None = None,
    batch_size: int = 2,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Probabilities [C, z, y, x] for a float image [z, y, x] in [0, 1].

    Windows of the model's crop size tile the image with ``overlap`` voxels (default: a quarter
    of the window) and are blended with cosine weights. Images smaller than a window are
    reflect-padded and cropped back.
    """
    window = tuple(int(w) for w in window)
    overlap = tuple(int(o) for o in (overlap or [w // 4 for w in window]))
    pad = [max(0, w - s) for w, s in zip(window, image.shape, strict=True)]
    padded = np.pad(image, [(0, p) for p in pad], mode="reflect" if max(pad) else "constant")
    shape = padded.shape
    strides = [max(1, w - o) for w, o in zip(window, overlap, strict=True)]
    origins = list(
        itertools.product(
            *[window_starts(s, w, st) for s, w, st in zip(shape, window, strides, strict=True)]
        )
    )
    weights = blend_weights(window)
    was_training = model.training
    model.eval()
    out = None
    total = np.zeros(shape, np.float32)
    for i in range(0, len(origins), batch_size):
        chunk = origins[i : i + batch_size]
        batch = np.stack(
            [padded[z : z + window[0], y : y + window[1], x : x + window[2]] for z, y, x in chunk]
        )
        logits = model(torch.from_numpy(batch[:, None]).float().to(device))
        probs = torch.sigmoid(logits.float()).cpu().numpy()
        if out is None:
            out = np.zeros((probs.shape[1], *shape), np.float32)
        for (z, y, x), prob in zip(chunk, probs, strict=True):
            region = (slice(z, z + window[0]), slice(y, y + window[1]), slice(x, x + window[2]))
            out[(slice(None), *region)] += prob * weights
            total[region] += weights
    model.train(was_training)
    out /= total[None]
    return out[(slice(None), *(slice(0, s) for s in image.shape))]


def segment_affinities(
    affs: np.ndarray,
    thresholds: Sequence[float],
    *,
    voxel_size: Sequence[float] | None = None,
) -> dict[float, np.ndarray]:
    """Instance labels from affinities: edge-respecting fragments, then waterz per threshold."""
    affs = np.ascontiguousarray(affs[:3], dtype=np.float32)
    fragments = fragments_from_affinities(affs, voxel_size=voxel_size)
    return agglomerate(affs, sorted(thresholds), fragments=fragments)


def segment_binary(
    probability: np.ndarray, threshold: float = 0.5, instances: bool = False
) -> np.ndarray:
    """A binary mask (uint8), or connected-component instances (uint32) when ``instances``."""
    mask = probability > threshold
    if instances:
        return cc3d.connected_components(mask, connectivity=6).astype(np.uint32)
    return mask.astype(np.uint8)
