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
``source(grid, rng)`` returning per-token probabilities (float in [0, 1], sampled here) or
choices (bool). Until a source is set it masks at random at its ``ratio``. Two rules turn the
source's choices into masks:

- **fixed count, learned placement** (``count="fixed"``, dbMiM's default): the choices are
  *nominations*; every sample masks exactly K = ``masked_count(ratio, N)`` tokens, of which
  round(alpha * K) are drawn from the nominees (:func:`nominated_mask`) and the rest uniformly at
  random. The count never depends on the source; ``alpha`` follows an :class:`AlphaSchedule`.
- **emergent count** (``count="emergent"``): the choices are the mask itself, so the count is
  whatever the source chose (fixed up to keep one visible and one masked token).
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
CountRule = Literal["fixed", "emergent"]


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


def nominated_mask(
    nominations: np.ndarray, count: int, alpha: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Exactly ``count`` masked tokens per sample, round(alpha * count) of them from the nominees.

    ``nominations``: bool [B, ...] (True = nominated). In each sample, round(alpha * count)
    tokens are drawn uniformly at random among the nominees (all of them, topped up with random
    other tokens, when there are too few); the rest of the count is drawn uniformly at random
    among the tokens not yet masked (nominees included), so every token keeps a chance to be
    masked and scored whatever the nominations say. Returns ``(mask, from_nominations)``, both
    bool of the input's shape: the mask, and the masked tokens that were drawn as nominees.
    """
    nominations = np.asarray(nominations, dtype=bool)
    flat = nominations.reshape(len(nominations), -1)
    b, n = flat.shape
    if not 0 <= count <= n:
        raise MaskingError(f"cannot mask {count} of {n} tokens")
    if not 0 <= alpha <= 1:
        raise MaskingError(f"alpha must be in [0, 1], got {alpha}")
    chosen = min(int(round(alpha * count)), count)
    rows = np.arange(b)[:, None]
    # nominees first, in random order, then the others in random order: the first `chosen`
    order = np.argsort(rng.random((b, n)) + (~flat), axis=1, kind="stable")
    picked = np.zeros((b, n), dtype=bool)
    picked[rows, order[:, :chosen]] = True
    # the rest uniformly among the tokens not picked yet
    rest = np.argsort(rng.random((b, n)) + picked, axis=1, kind="stable")
    mask = picked.copy()
    mask[rows, rest[:, : count - chosen]] = True
    return mask.reshape(nominations.shape), (picked & flat).reshape(nominations.shape)


class AlphaSchedule(StrictModel):
    """alpha_t, the share of each sample's K masked tokens drawn from the policy's nominations.

    It rises linearly from ``start`` to ``end`` over the first ``ramp`` fraction of the run's
    steps and then stays at ``end`` (hard-patches mining's easy-to-hard schedule, Wang et al.
    CVPR 2023: 0 -> 0.5). The random share, 1 - alpha_t, keeps losses of patches the policy did
    not nominate (its counterfactuals) in every crop.
    """

    start: float = Field(0.0, ge=0, le=1)
    end: float = Field(0.5, ge=0, le=1)
    ramp: float = Field(1.0, ge=0, le=1)
    """Fraction of ``run.steps`` over which alpha goes from start to end (0: end from step 0)."""

    def at(self, step: int, total_steps: int | None) -> float:
        """alpha at trainer step ``step`` of ``total_steps`` (None: the schedule's start)."""
        if self.ramp == 0:
            return self.end
        progress = min(1.0, max(0.0, step / total_steps)) if total_steps else 0.0
        return self.start + (self.end - self.start) * min(1.0, progress / self.ramp)


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

    The source is ``source(grid, rng) -> array [B, Nz, Ny, Nx]``: bool choices (used as given),
    or float probabilities of choosing each token (sampled independently here with ``rng``).
    With ``count="fixed"`` (the default) the choices are nominations and each sample masks
    exactly ``masked_count(ratio, N)`` tokens, ``round(alpha * K)`` of them from the nominees
    (:func:`nominated_mask`); with ``count="emergent"`` the choices are the mask, fixed up to
    keep one visible and one masked token. The source is runtime state, not config: it is not
    serialised.
    """

    name: Literal["policy"] = "policy"
    ratio: float = Field(
        0.75,
        gt=0,
        lt=1,
        description="K = round(ratio * N) masked tokens per sample (fixed count), and the "
        "random-masking ratio before a source is set",
    )
    invert: bool = Field(
        False,
        description="the inverted control: nominate what the source ranks lowest (the trainer "
        "turns probabilities p into 1 - p and scores into their reverse order)",
    )
    _source: MaskSource | None = PrivateAttr(default=None)
    _count: CountRule = PrivateAttr(default="fixed")
    _alpha: float = PrivateAttr(default=0.0)
    _last: dict[str, float] = PrivateAttr(default_factory=dict)

    def set_source(
        self, source: MaskSource | None, *, count: CountRule = "fixed", alpha: float = 0.0
    ) -> None:
        """Use ``source`` from now on (None goes back to random masking at ``ratio``).

        ``count``: "fixed" (exactly K masked per sample, ``alpha`` of them from the nominees) or
        "emergent" (the source's choices are the mask).
        """
        if source is not None and not callable(source):
            raise MaskingError(f"a mask source must be callable(grid, rng), got {type(source)}")
        if count not in ("fixed", "emergent"):
            raise MaskingError(f"count must be 'fixed' or 'emergent', got {count!r}")
        if not 0 <= alpha <= 1:
            raise MaskingError(f"alpha must be in [0, 1], got {alpha}")
        self._source, self._count, self._alpha = source, count, float(alpha)

    @property
    def has_source(self) -> bool:
        return self._source is not None

    @property
    def last_stats(self) -> dict[str, float]:
        """What the last :meth:`mask` call did: ``nominated`` (share of tokens the source chose),
        ``from_nominations`` (share of the masked tokens drawn as nominees; 1 under the emergent
        rule, 0 before a source is set) and ``alpha``."""
        return dict(self._last)

    def mask(self, grid: Sequence[int], rng: np.random.Generator) -> np.ndarray:
        dims = check_grid(grid)
        source = self._source
        if source is None:
            self._last = {"nominated": 0.0, "from_nominations": 0.0, "alpha": 0.0}
            return RandomMasker(ratio=self.ratio).mask(dims, rng)
        choices = self._choices(np.asarray(source(dims, rng)), dims, rng)
        if self._count == "fixed":
            k = masked_count(self.ratio, dims[1] * dims[2] * dims[3])
            mask, nominated = nominated_mask(choices, k, self._alpha, rng)
            self._last = {
                "nominated": float(choices.mean()),
                "from_nominations": float(nominated.sum() / mask.sum()),
                "alpha": self._alpha,
            }
            return mask
        self._last = {"nominated": float(choices.mean()), "from_nominations": 1.0, "alpha": 1.0}
        return choices

    def _choices(self, out: np.ndarray, dims: BatchGrid, rng: np.random.Generator) -> np.ndarray:
        """The source's bool choices: as given, or sampled from its probabilities."""
        if out.shape != dims:
            raise MaskingError(
                f"mask source returned shape {out.shape}, expected {dims} (B, Nz, Ny, Nx)"
            )
        emergent = self._count == "emergent"
        if out.dtype == bool:
            return ensure_both(out.copy(), rng.random(dims)) if emergent else out.copy()
        probs = out.astype(np.float64)
        if not np.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1:
            raise MaskingError(
                "mask source returned probabilities outside [0, 1] or non-finite values; "
                "return sigmoid/softmax outputs (probability of masking each token) or bool masks"
            )
        choices = rng.random(dims) < probs
        if not emergent:
            return choices
        # tiny jitter breaks ties when the fix-up picks a token
        return ensure_both(choices, probs + 1e-9 * rng.random(dims))


@MASKERS.register("heuristic")
class HeuristicMasker(PolicyMasker):
    """A cheap content-aware control for dbMiM: its fixed-count rule with the nominations taken
    from the crop itself instead of a policy.

    Every sample masks exactly K = ``masked_count(ratio, N)`` tokens: the round(alpha * K) with
    the highest ``score`` (gradient energy: the mean squared forward difference over the patch;
    the lowest with ``invert``) and the rest uniformly at random, alpha following the same
    schedule as the policy's share (``rl.env.alpha``). The task that owns the crops sets the
    source each step (:class:`neuroray.trainers.dbmim.DbMiMTask`); without one it masks at random.
    """

    name: Literal["heuristic"] = "heuristic"  # type: ignore[assignment]
    score: Literal["gradient_energy"] = "gradient_energy"


MaskerSpec = Annotated[
    RandomMasker | TubeMasker | BlockMasker | PolicyMasker | HeuristicMasker,
    Field(discriminator="name"),
]
"""Config field type for a masker: ``masking: MaskerSpec = RandomMasker()``; YAML gives ``name``."""


def build_masker(name: str, **options: Any) -> Masker:
    """The masker registered as ``name`` with YAML-style options (bad keys raise ConfigError)."""
    cls = MASKERS.get(name)
    return validate(cls, {**options, "name": name}, source=f"masker {name!r}")


__all__ = [
    "MASKERS",
    "AlphaSchedule",
    "BatchGrid",
    "BlockMasker",
    "CountRule",
    "HeuristicMasker",
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
    "nominated_mask",
]
