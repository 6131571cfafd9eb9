"""Maskers: which patches of each crop a masked-image model must reconstruct.

One interface, shared by the pretraining loops and the dbMiM agents::

    masker.mask(grid, rng) -> bool ndarray [B, Nz, Ny, Nx]    (True = masked / hidden)

``grid`` is (B, Nz, Ny, Nx), the batch size and token grid; ``rng`` a ``np.random.Generator``, so
a seed fixes the masks. Every mask keeps at least one visible and one masked token per sample.
Ratios are exact: a masker at ratio r hides ``round(r * n)`` of n tokens (clamped to 1 .. n-1),
where n is the tokens per sample (per (y, x) column for the tube masker).

Maskers are pydantic configs as well as objects, so YAML names one by ``name`` with its options
(``MaskerSpec`` is the discriminated union to use as a config field), and ``MASKERS`` holds them
by name for :func:`build_masker` and for tests.

``PolicyMasker`` takes its masks from an external source (dbMiM's RL policy): a callable
``source(grid, rng)`` returning per-token mask probabilities (float in [0, 1], sampled here) or
masks (bool). Until a source is set it masks at random at its ``ratio``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, PrivateAttr, model_validator
from scipy import ndimage

from neuroray.config import StrictModel, validate
from neuroray.errors import NeurorayError
from neuroray.registry import Registry

BatchGrid = tuple[int, int, int, int]
MaskSource = Callable[[BatchGrid, np.random.Generator], Any]


class MaskingError(NeurorayError):
    """A mask request or a mask source is inconsistent (bad grid, wrong shape, bad probabilities)."""


MASKERS: Registry[type[Masker]] = Registry("masker")


def check_grid(grid: Sequence[int]) -> BatchGrid:
    """Validate (B, Nz, Ny, Nx): four positive ints with at least two tokens per sample."""
    try:
        dims = tuple(int(g) for g in grid)
    except (TypeError, ValueError):
        raise MaskingError(f"grid must be (B, Nz, Ny, Nx) integers, got {grid!r}") from None
    if len(dims) != 4 or min(dims) < 1:
        raise MaskingError(f"grid must be four positive sizes (B, Nz, Ny, Nx), got {grid!r}")
    if dims[1] * dims[2] * dims[3] < 2:
        raise MaskingError(
            f"token grid {dims[1:]} has fewer than 2 tokens: a mask needs one visible and one "
            "masked token; use a larger crop or a smaller patch"
        )
    return dims  # type: ignore[return-value]


def masked_count(ratio: float, n: int) -> int:
    """Tokens to mask out of n at a ratio: round(ratio * n), clamped to 1 .. n-1."""
    return min(max(int(round(ratio * n)), 1), n - 1)


def mask_ratio(mask: np.ndarray) -> np.ndarray:
    """Fraction of masked tokens of each sample: [B]."""
    return mask.reshape(len(mask), -1).mean(axis=1)


def ensure_both(mask: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Make every sample keep >= 1 visible and >= 1 masked token (in place, returned).

    A sample with everything masked unmasks its lowest-scoring token; one with nothing masked
    masks its highest-scoring token (scores: same shape, higher = more maskable).
    """
    flat, s = mask.reshape(len(mask), -1), scores.reshape(len(scores), -1)
    rows = np.arange(len(flat))
    all_masked, none_masked = flat.all(1), ~flat.any(1)
    flat[rows[all_masked], s[all_masked].argmin(1)] = False
    flat[rows[none_masked], s[none_masked].argmax(1)] = True
    return mask


class Masker(StrictModel, ABC):
    """Base of every masker: ``mask(grid, rng) -> bool[B, Nz, Ny, Nx]`` (True = masked)."""

    name: str

    @abstractmethod
    def mask(self, grid: Sequence[int], rng: np.random.Generator) -> np.ndarray:
        """Masks for a batch of token grids."""


@MASKERS.register("random")
class RandomMasker(Masker):
    """Uniformly random tokens, exactly ``masked_count(ratio, N)`` per sample (MAE)."""

    name: Literal["random"] = "random"
    ratio: float = Field(0.75, gt=0, lt=1)

    def mask(self, grid: Sequence[int], rng: np.random.Generator) -> np.ndarray:
        b, nz, ny, nx = check_grid(grid)
        n = nz * ny * nx
        order = np.argsort(rng.random((b, n)), axis=1)
        flat = np.zeros((b, n), dtype=bool)
        np.put_along_axis(flat, order[:, : masked_count(self.ratio, n)], True, axis=1)
        return flat.reshape(b, nz, ny, nx)


@MASKERS.register("tube")
class TubeMasker(Masker):
    """Random (y, x) columns masked through the whole depth (VideoMAE's tubes along z)."""

    name: Literal["tube"] = "tube"
    ratio: float = Field(0.75, gt=0, lt=1)

    def mask(self, grid: Sequence[int], rng: np.random.Generator) -> np.ndarray:
        b, nz, ny, nx = check_grid(grid)
        if ny * nx < 2:
            raise MaskingError(
                f"tube masking needs at least 2 (y, x) columns, grid has {ny}x{nx}; "
                "use the random masker or a wider crop"
            )
        columns = RandomMasker(ratio=self.ratio).mask((b, 1, ny, nx), rng)
        return np.repeat(columns, nz, axis=1)


@MASKERS.register("block")
class BlockMasker(Masker):
    """Contiguous cuboids of tokens (BEiT's block-wise masking in 3D), exact count per sample.

    Cuboids with per-axis sizes drawn from ``min_block`` .. ``max_block`` (tokens, z, y, x; clipped
    to the grid) are placed at random while they fit in the budget; the remainder is grown from
    the blocks' faces one token layer at a time, so every masked token touches a block and each
    6-connected masked region holds at least one whole block.
    """

    name: Literal["block"] = "block"
    ratio: float = Field(0.75, gt=0, lt=1)
    min_block: tuple[int, int, int] = (1, 2, 2)
    max_block: tuple[int, int, int] = (4, 4, 4)
    attempts: int = Field(100, ge=1, description="placement tries per sample before growing")

    @model_validator(mode="after")
    def _sizes(self) -> BlockMasker:
        if min(self.min_block) < 1 or any(
            a > b for a, b in zip(self.min_block, self.max_block, strict=True)
        ):
            raise ValueError(
                f"need 1 <= min_block <= max_block per axis, got {self.min_block}, {self.max_block}"
            )
        return self

    def mask(self, grid: Sequence[int], rng: np.random.Generator) -> np.ndarray:
        b, nz, ny, nx = check_grid(grid)
        k = masked_count(self.ratio, nz * ny * nx)
        return np.stack([self._one((nz, ny, nx), k, rng) for _ in range(b)])

    def _one(self, shape: tuple[int, int, int], k: int, rng: np.random.Generator) -> np.ndarray:
        size_lo = np.minimum(self.min_block, shape)
        size_hi = np.minimum(self.max_block, shape)
        mask = np.zeros(shape, dtype=bool)
        count = 0
        for _ in range(self.attempts):
            if count >= k:
                break
            size = rng.integers(size_lo, size_hi + 1)
            origin = rng.integers(0, np.asarray(shape) - size + 1)
            region = tuple(slice(o, o + s) for o, s in zip(origin, size, strict=True))
            new = int((~mask[region]).sum())
            if count + new <= k:
                mask[region] = True
                count += new
        if count == 0:  # no block fits the budget: grow from a single seed token
            mask.flat[rng.integers(mask.size)] = True
            count = 1
        while count < k:
            frontier = np.flatnonzero(ndimage.binary_dilation(mask) & ~mask)
            take = rng.choice(frontier, size=min(k - count, frontier.size), replace=False)
            mask.flat[take] = True
            count += take.size
        return mask


@MASKERS.register("policy")
class PolicyMasker(Masker):
    """Masks from an external source (dbMiM's RL policy); random at ``ratio`` until one is set.

    The source is ``source(grid, rng) -> array [B, Nz, Ny, Nx]``: bool masks (used as given), or
    float probabilities of masking each token (sampled independently here with ``rng``). Either
    way each sample is then fixed up to keep one visible and one masked token. The source is
    runtime state, not config: it is not serialised.
    """

    name: Literal["policy"] = "policy"
    ratio: float = Field(
        0.75, gt=0, lt=1, description="random-masking ratio before a source is set"
    )
    _source: MaskSource | None = PrivateAttr(default=None)

    def set_source(self, source: MaskSource | None) -> None:
        """Use ``source`` from now on (None goes back to random masking)."""
        if source is not None and not callable(source):
            raise MaskingError(f"a mask source must be callable(grid, rng), got {type(source)}")
        self._source = source

    @property
    def has_source(self) -> bool:
        return self._source is not None

    def mask(self, grid: Sequence[int], rng: np.random.Generator) -> np.ndarray:
        dims = check_grid(grid)
        source = self._source
        if source is None:
            return RandomMasker(ratio=self.ratio).mask(dims, rng)
        out = np.asarray(source(dims, rng))
        if out.shape != dims:
            raise MaskingError(
                f"mask source returned shape {out.shape}, expected {dims} (B, Nz, Ny, Nx)"
            )
        if out.dtype == bool:
            return ensure_both(out.copy(), rng.random(dims))
        probs = out.astype(np.float64)
        if not np.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1:
            raise MaskingError(
                "mask source returned probabilities outside [0, 1] or non-finite values; "
                "return sigmoid/softmax outputs (probability of masking each token) or bool masks"
            )
        # tiny jitter breaks ties when the fix-up picks a token
        return ensure_both(rng.random(dims) < probs, probs + 1e-9 * rng.random(dims))


MaskerSpec = Annotated[
    RandomMasker | TubeMasker | BlockMasker | PolicyMasker, Field(discriminator="name")
]
"""Config field type for a masker: ``masking: MaskerSpec = RandomMasker()``; YAML gives ``name``."""


def build_masker(name: str, **options: Any) -> Masker:
    """The masker registered as ``name`` with YAML-style options (bad keys raise ConfigError)."""
    cls = MASKERS.get(name)
    return validate(cls, {**options, "name": name}, source=f"masker {name!r}")


__all__ = [
    "MASKERS",
    "BatchGrid",
    "BlockMasker",
    "Masker",
    "MaskerSpec",
    "MaskingError",
    "MaskSource",
    "PolicyMasker",
    "RandomMasker",
    "TubeMasker",
    "build_masker",
    "check_grid",
    "ensure_both",
    "mask_ratio",
    "masked_count",
]
