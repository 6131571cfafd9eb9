"""The no-learning baseline: what smoothing and one or two thresholds get, with no network.

Every quality table and the demo print it first, so a learned row shows what learning adds.
Its parameters are chosen on training data only (the held-out data is segmented once, with the
fitted parameters, and scored).

- **EM neurons** (:func:`fit_em_baseline`): Gaussian-smoothed intensity, normalised per image to
  [0, 1] (1st / 99th percentile), read as boundary evidence (membranes are dark in these FIB-SEM
  volumes): the affinity of a nearest-neighbour edge is the mean of its two voxels' normalised
  intensity (:func:`intensity_affinities`). Those affinities go through the project's own
  fragments + waterz (:mod:`neuroray.segmentation.agglomerate`, as
  :func:`neuroray.segmentation.inference.segment_affinities`), and the fit keeps the smoothing
  and waterz threshold with the lowest VOI on the training labels.
- **Binary tasks** (mito, LM; :func:`fit_binary_baseline`): smoothed intensity above (or below)
  one global threshold; the fit chooses smoothing, threshold *and* polarity by mean Dice over
  the training volumes (LM neurons are bright, mitochondria in EM dark). Dice is computed for
  every candidate threshold at once from one histogram per volume.

Smoothing widths are in nm (a float: the same physical width on every axis; or z, y, x), so one
setting means the same on 10 nm isotropic FIB-SEM, 50 x 4.6 x 4.6 nm ssTEM and LM stacks; the
defaults are multiples of the finest voxel edge. :func:`baseline_summary` fits on a training
part and returns the test metrics of the task (``em``: VOI, ARAND; ``mito`` / ``lm``: Dice, IoU)
with the chosen parameters, as one row of a quality table.

    >>> em = fit_em_baseline(train_image, train_labels, voxel_size=(10, 10, 10))
    >>> em.sigma_nm, em.threshold            # chosen on the training labels only
    >>> labels = em.segment(test_image)      # uint64 instances
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from neuroray.errors import NeurorayError
from neuroray.segmentation.agglomerate import AGGLOMERATORS, fragments_from_affinities
from neuroray.segmentation.inference import segment_affinities
from neuroray.segmentation.metrics import evaluate_segmentation
from neuroray.segmentation.targets import NEAREST_OFFSETS, edge_slices

Sigma = float | tuple[float, float, float]
"""A Gaussian's standard deviation in nm: one value for every axis, or (z, y, x)."""
VoxelSize = Sequence[float]
Polarity = Literal["above", "below"]

EM_SIGMA_STEPS: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)
"""Default EM smoothing candidates, in units of the finest voxel edge (fib_medulla_s2: 0-20 nm)."""
EM_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))
"""Default waterz merge thresholds tried by :func:`fit_em_baseline` (0.05 ... 0.95)."""
BINARY_SIGMA_STEPS: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
"""Default binary smoothing candidates, in units of the finest voxel edge (DIADEM LM: 1.5 is
~500 nm, the 0.5 x 1.5 x 1.5 px the LM benchmark used before; vnc_stack1 mitochondria are
best found at 12, ~55 nm)."""
BINARY_BINS = 512
"""Default number of candidate thresholds for binary fits: evenly spaced over the training
volumes' smoothed intensity range."""
NORMALISE_PERCENTILES = (1.0, 99.0)


class BaselineError(NeurorayError):
    """Images and labels the baseline cannot be fitted on (shapes, dimensions, no labels)."""


# ------------------------------------------------------------------ shared steps
def sigma_voxels(sigma_nm: Sigma, voxel_size: VoxelSize) -> tuple[float, float, float]:
    """A smoothing width in nm as voxels per axis (z, y, x)."""
    voxel = _voxel_size(voxel_size)
    widths = _sigma_axes(sigma_nm)
    return (widths[0] / voxel[0], widths[1] / voxel[1], widths[2] / voxel[2])


def smooth(image: np.ndarray, sigma_nm: Sigma, voxel_size: VoxelSize) -> np.ndarray:
    """The image as float32, Gaussian-smoothed with ``sigma_nm`` (nm; 0 leaves it as it is)."""
    image = np.asarray(image, dtype=np.float32)
    sigma = sigma_voxels(sigma_nm, voxel_size)
    if not any(sigma):
        return image
    return ndimage.gaussian_filter(image, sigma, mode="reflect")


def normalise(
    image: np.ndarray, percentiles: tuple[float, float] = NORMALISE_PERCENTILES
) -> np.ndarray:
    """Intensities mapped to [0, 1] between two percentiles of the image itself (clipped), so a
    volume with another contrast or brightness reads the same; a flat image gives 0.5."""
    low, high = np.percentile(image, percentiles)
    if high <= low:
        return np.full(image.shape, 0.5, dtype=np.float32)
    scaled = (np.asarray(image, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(scaled, 0.0, 1.0, out=scaled)


def intensity_affinities(image: np.ndarray, sigma_nm: Sigma, voxel_size: VoxelSize) -> np.ndarray:
    """Nearest-neighbour affinities [3, z, y, x] (float32) from intensity alone.

    Dark is boundary: the smoothed image is normalised to [0, 1] (:func:`normalise`) and the
    affinity of the edge between ``v`` and ``v - offset`` is the mean of the two voxels' values,
    stored at ``v`` (the convention of :mod:`neuroray.segmentation.targets`). Edges to outside
    the array (first slice along each axis) take the voxel's own value.
    """
    value = normalise(smooth(image, sigma_nm, voxel_size))
    affs = np.empty((len(NEAREST_OFFSETS), *value.shape), dtype=np.float32)
    for channel, offset in enumerate(NEAREST_OFFSETS):
        at, neighbour = edge_slices(value.shape, offset)
        affs[channel] = value
        affs[channel][at] += value[neighbour]
        affs[channel][at] *= 0.5
    return affs


def _voxel_size(voxel_size: VoxelSize) -> tuple[float, float, float]:
    voxel = tuple(float(v) for v in voxel_size)
    if len(voxel) != 3 or not all(np.isfinite(v) and v > 0 for v in voxel):
        raise BaselineError(
            f"voxel_size must be three positive nm values (z, y, x), got {voxel_size}"
        )
    return voxel  # type: ignore[return-value]


def _default_sigmas(steps: Sequence[float], voxel_size: VoxelSize) -> tuple[float, ...]:
    finest = min(_voxel_size(voxel_size))
    return tuple(round(step * finest, 3) for step in steps)


def _pairs(
    images: np.ndarray | Sequence[np.ndarray], labels: np.ndarray | Sequence[np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """One (image, labels) pair per training volume, checked."""
    if isinstance(images, np.ndarray) or isinstance(labels, np.ndarray):
        images, labels = [images], [labels]  # type: ignore[list-item]
    images, labels = list(images), list(labels)  # type: ignore[arg-type]
    if not images or len(images) != len(labels):
        raise BaselineError(
            f"give one labels volume per image (got {len(images)} images, {len(labels)} labels)"
        )
    pairs = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        image, label = np.asarray(image), np.asarray(label)
        if image.ndim != 3 or image.shape != label.shape:
            raise BaselineError(
                f"training volume {i}: image {image.shape} and labels {label.shape} must be the "
                "same 3D (z, y, x) shape"
            )
        if not label.any():
            raise BaselineError(f"training volume {i} has no labelled voxel to fit on")
        pairs.append((image, label))
    return pairs


def _sigma_axes(sigma_nm: Sigma) -> tuple[float, float, float]:
    widths = np.atleast_1d(np.asarray(sigma_nm, dtype=float))
    if widths.shape == (1,):
        widths = np.repeat(widths, 3)
    if widths.shape != (3,) or not (np.isfinite(widths).all() and (widths >= 0).all()):
        raise BaselineError(f"sigma must be one or three non-negative nm values, got {sigma_nm}")
    return (float(widths[0]), float(widths[1]), float(widths[2]))


def _sigma_record(sigma_nm: Sigma) -> float | list[float]:
    """A sigma as JSON: one number when isotropic as given, else [z, y, x]."""
    widths = _sigma_axes(sigma_nm)
    return widths[0] if np.ndim(sigma_nm) == 0 else list(widths)


def _sigma_text(sigma_nm: Sigma) -> str:
    widths = _sigma_axes(sigma_nm)
    return f"{widths[0]:.3g}" if np.ndim(sigma_nm) == 0 else "x".join(f"{w:.3g}" for w in widths)


# ------------------------------------------------------------------ EM neurons
@dataclass(frozen=True)
class EMBaseline:
    """Smoothed intensity -> affinities -> fragments + waterz at one threshold, fitted."""

    sigma_nm: Sigma
    threshold: float
    voxel_size: tuple[float, float, float]
    train_voi: float
    """Mean VOI over the training volumes at the chosen parameters."""
    search: list[dict[str, Any]] = field(default_factory=list, repr=False, compare=False)
    """Every (sigma_nm, threshold) tried with its mean training VOI, in the order tried."""

    def affinities(self, image: np.ndarray) -> np.ndarray:
        return intensity_affinities(image, self.sigma_nm, self.voxel_size)

    def segment(self, image: np.ndarray) -> np.ndarray:
        """uint64 instance labels of ``image`` (z, y, x; same voxel size as the training data)."""
        affs = self.affinities(np.asarray(image))
        segmentations = segment_affinities(affs, [self.threshold], voxel_size=self.voxel_size)
        return segmentations[self.threshold]

    def params(self) -> dict[str, Any]:
        return {
            "sigma_nm": _sigma_record(self.sigma_nm),
            "threshold": self.threshold,
            "voxel_size": list(self.voxel_size),
            "train_voi": self.train_voi,
        }

    def describe(self) -> str:
        sigma = _sigma_text(self.sigma_nm)
        return f"smoothed intensity (σ {sigma} nm) -> waterz at {self.threshold:g}"


def fit_em_baseline(
    image: np.ndarray | Sequence[np.ndarray],
    labels: np.ndarray | Sequence[np.ndarray],
    voxel_size: VoxelSize,
    *,
    sigmas: Sequence[Sigma] | None = None,
    thresholds: Sequence[float] = EM_THRESHOLDS,
) -> EMBaseline:
    """Choose the smoothing (nm) and waterz threshold with the lowest mean VOI on training data.

    ``image`` / ``labels`` are one training volume or a list of them (label 0 is ignored, as
    in :func:`~neuroray.segmentation.metrics.evaluate_segmentation`). ``sigmas`` default to
    :data:`EM_SIGMA_STEPS` times the finest voxel edge. Fragments are computed once per sigma
    and every threshold is read off one waterz run, as ``segment_affinities`` does; ties go to
    the first candidate (least smoothing, lowest threshold).
    """
    voxel = _voxel_size(voxel_size)
    pairs = _pairs(image, labels)
    if sigmas is None:
        sigmas = _default_sigmas(EM_SIGMA_STEPS, voxel)
    sigmas = list(sigmas)
    thresholds = sorted(float(t) for t in thresholds)
    if not sigmas or not thresholds:
        raise BaselineError("fit_em_baseline needs at least one sigma and one threshold")
    waterz = AGGLOMERATORS.get("waterz")
    totals = np.zeros((len(sigmas), len(thresholds)))
    for s, sigma in enumerate(sigmas):
        for volume, truth in pairs:
            affs = intensity_affinities(volume, sigma, voxel)
            # segment_affinities' two steps, its waterz run iterated so only one
            # segmentation per threshold is held at a time
            fragments = fragments_from_affinities(affs, voxel_size=voxel)
            steps = waterz(affs, NEAREST_OFFSETS, thresholds, fragments=fragments)
            for t, (_, segmentation) in enumerate(steps):
                totals[s, t] += evaluate_segmentation(segmentation, truth).voi
    mean = totals / len(pairs)
    s, t = np.unravel_index(int(np.argmin(mean)), mean.shape)
    search = [
        {"sigma_nm": _sigma_record(sigma), "threshold": threshold, "voi": float(mean[i, j])}
        for i, sigma in enumerate(sigmas)
        for j, threshold in enumerate(thresholds)
    ]
    return EMBaseline(sigmas[s], thresholds[t], voxel, float(mean[s, t]), search)


# ------------------------------------------------------------------ binary tasks
@dataclass(frozen=True)
class BinaryBaseline:
    """Smoothed intensity above (or below) one global threshold, fitted."""

    sigma_nm: Sigma
    threshold: float
    polarity: Polarity
    voxel_size: tuple[float, float, float]
    train_dice: float
    """Mean Dice over the training volumes at the chosen parameters."""

    def segment(self, image: np.ndarray) -> np.ndarray:
        """A uint8 foreground mask: smoothed intensity ``>= threshold`` (``above``) or
        ``< threshold`` (``below``)."""
        value = smooth(image, self.sigma_nm, self.voxel_size)
        threshold = np.float32(self.threshold)
        mask = value >= threshold if self.polarity == "above" else value < threshold
        return mask.astype(np.uint8)

    def params(self) -> dict[str, Any]:
        return {
            "sigma_nm": _sigma_record(self.sigma_nm),
            "threshold": self.threshold,
            "polarity": self.polarity,
            "voxel_size": list(self.voxel_size),
            "train_dice": self.train_dice,
        }

    def describe(self) -> str:
        sign = ">=" if self.polarity == "above" else "<"
        sigma = _sigma_text(self.sigma_nm)
        return f"smoothed intensity (σ {sigma} nm) {sign} {self.threshold:.4g}"


def _dice_curves(value: np.ndarray, truth: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Dice of ``value >= edges[k]`` (row 0) and ``value < edges[k]`` (row 1) for every k,
    exactly, from one histogram: bin k + 1 holds edges[k] <= value < edges[k + 1]."""
    bins = np.searchsorted(edges, value.ravel(), side="right")
    everything = np.bincount(bins, minlength=len(edges) + 1)
    foreground = np.bincount(bins[truth.ravel()], minlength=len(edges) + 1)
    # below[k] = voxels with value < edges[k] = bins 0..k; above is the rest
    below, below_fg = np.cumsum(everything)[:-1], np.cumsum(foreground)[:-1]
    above, above_fg = value.size - below, foreground.sum() - below_fg
    actual = foreground.sum()
    curves = []
    for predicted, both in ((above, above_fg), (below, below_fg)):
        denominator = predicted + actual
        safe = np.maximum(denominator, 1)
        curves.append(np.where(denominator == 0, 1.0, 2.0 * both / safe))
    return np.stack(curves)


def fit_binary_baseline(
    image: np.ndarray | Sequence[np.ndarray],
    labels: np.ndarray | Sequence[np.ndarray],
    voxel_size: VoxelSize,
    *,
    sigmas: Sequence[Sigma] | None = None,
    thresholds: Sequence[float] | None = None,
    polarities: Sequence[Polarity] = ("above", "below"),
) -> BinaryBaseline:
    """Choose smoothing, threshold and polarity with the best mean Dice on training data.

    ``labels`` > 0 is the foreground. ``thresholds`` default to :data:`BINARY_BINS` values
    evenly spaced over the training volumes' smoothed range (per sigma); ``polarities`` limits
    the choice (e.g. ``("above",)`` for bright neurons). Ties go to the first candidate.
    """
    voxel = _voxel_size(voxel_size)
    pairs = [(volume, truth > 0) for volume, truth in _pairs(image, labels)]
    if sigmas is None:
        sigmas = _default_sigmas(BINARY_SIGMA_STEPS, voxel)
    sigmas = list(sigmas)
    allowed = [0 if p == "above" else 1 for p in polarities]
    if not sigmas or not allowed or any(p not in ("above", "below") for p in polarities):
        raise BaselineError(
            f"need at least one sigma and polarities from ('above', 'below'), got {polarities}"
        )
    best: BinaryBaseline | None = None
    for sigma in sigmas:
        values = [smooth(volume, sigma, voxel) for volume, _ in pairs]
        if thresholds is None:
            low = min(float(v.min()) for v in values)
            high = max(float(v.max()) for v in values)
            edges = np.linspace(low, high, BINARY_BINS, dtype=np.float32)
        else:
            edges = np.unique(np.asarray(thresholds, dtype=np.float32))
        truths = [truth for _, truth in pairs]
        curves = np.mean(
            [_dice_curves(v, t, edges) for v, t in zip(values, truths, strict=True)], 0
        )
        for row in allowed:
            k = int(np.argmax(curves[row]))
            if best is None or curves[row, k] > best.train_dice:
                polarity: Polarity = "above" if row == 0 else "below"
                best = BinaryBaseline(
                    sigma, float(edges[k]), polarity, voxel, float(curves[row, k])
                )
    assert best is not None
    return best


# ------------------------------------------------------------------ one table row
def baseline_summary(
    task: str,
    train_image: np.ndarray | Sequence[np.ndarray],
    train_labels: np.ndarray | Sequence[np.ndarray],
    test_image: np.ndarray | Sequence[np.ndarray],
    test_labels: np.ndarray | Sequence[np.ndarray],
    voxel_size: VoxelSize,
    **fit_options: Any,
) -> dict[str, Any]:
    """Fit the task's baseline on the training part, segment the test part, score it.

    ``task`` is a registered task name (``em``: instances, VOI / ARAND; ``mito``, ``lm``:
    masks, Dice / IoU). Test metrics are the task's own evaluation metrics, averaged over test
    volumes when several are given, at top level (``voi``, ``voi_split``, ``voi_merge``,
    ``arand``, ``cremi_score`` / ``dice``, ``iou``); ``params`` holds the chosen parameters and
    ``seconds`` the fit and test-segmentation times. ``fit_options`` go to the fit function.
    """
    from neuroray.segmentation.tasks import get_task

    spec = get_task(task)
    fit = fit_em_baseline if spec.instances else fit_binary_baseline
    started = time.perf_counter()
    baseline = fit(train_image, train_labels, voxel_size, **fit_options)
    fitted = time.perf_counter()
    scores = []
    for volume, truth in _pairs(test_image, test_labels):
        segmentation = baseline.segment(volume)
        scores.append(spec.evaluate(segmentation, truth, voxel_size=baseline.voxel_size))
    segmented = time.perf_counter()
    metrics = {key: float(np.mean([s[key] for s in scores])) for key in scores[0]}
    return {
        "name": f"no-learning: {baseline.describe()}",
        "task": task,
        **metrics,
        "params": baseline.params(),
        "seconds": {"fit": round(fitted - started, 2), "segment": round(segmented - fitted, 2)},
    }
