"""PNG previews: a grey slice with labels or a mask overlaid, and grids of several such tiles.

Used by the demo, ``neuroray evaluate`` and TensorBoard image summaries, so a person can see at a
glance whether a segmentation is plausible.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def to_grey(image: np.ndarray) -> np.ndarray:
    """A 2D image as uint8 with its 1st–99th percentile stretched to the full range."""
    image = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(image, (1, 99)) if image.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return (np.clip((image - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def label_colours(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """A stable pseudo-random RGB colour per id (0 stays black), same id -> same colour."""
    ids = labels.astype(np.uint64)
    mixed = (ids * np.uint64(2654435761) + np.uint64(seed * 97 + 13)) & np.uint64(0xFFFFFF)
    rgb = np.stack([(mixed >> np.uint64(s)) & np.uint64(255) for s in (16, 8, 0)], axis=-1)
    rgb = (rgb.astype(np.uint16) // 2 + 100).astype(np.uint8)  # bright, saturated-ish
    rgb[labels == 0] = 0
    return rgb


def overlay(image: np.ndarray, labels: np.ndarray | None = None, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8: the grey image with each labelled (non-zero) voxel tinted by its id's colour."""
    grey = to_grey(image)
    rgb = np.repeat(grey[..., None], 3, axis=-1).astype(np.float32)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.dtype == bool:
            labels = labels.astype(np.uint8)
        colours = label_colours(labels).astype(np.float32)
        tinted = labels != 0
        rgb[tinted] = (1 - alpha) * rgb[tinted] + alpha * colours[tinted]
    return rgb.astype(np.uint8)


def grid(tiles: Sequence[np.ndarray], columns: int | None = None, gap: int = 4) -> np.ndarray:
    """Tiles (H, W, 3) of any sizes placed on a black canvas, row by row."""
    if not tiles:
        raise ValueError("grid needs at least one tile")
    tiles = [t if t.ndim == 3 else np.repeat(t[..., None], 3, axis=-1) for t in tiles]
    columns = columns or len(tiles)
    rows = -(-len(tiles) // columns)
    height = max(t.shape[0] for t in tiles)
    width = max(t.shape[1] for t in tiles)
    canvas = np.zeros((rows * (height + gap) - gap, columns * (width + gap) - gap, 3), np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        y, x = r * (height + gap), c * (width + gap)
        canvas[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
    return canvas


def save_png(rgb: np.ndarray, path: str | Path) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path
