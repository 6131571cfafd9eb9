"""Synthetic EM and LM volumes: the embedded default data for the demo and fast tests.

Both generators are pure numpy / scipy, seeded (same seed, same arrays, bit for bit) and fast
(EM 64x256x256 in about two seconds on one core). They are built from random branching trees
(:class:`~neuroray.platform.swc.SWCTree`) rasterised with :func:`~neuroray.platform.swc.rasterize`:

* :func:`synth_em`: densely packed neurites (tubes that branch, cross and touch), filled out to a
  complete tessellation, so every voxel belongs to a neuron, like the dense FIB-SEM ground truth in
  ``../shared/data/em``. Membranes are drawn dark wherever two ids touch, so a membrane lies
  between any two touching objects; mitochondria are dark blobs
  inside neurites; cytoplasm has per-neuron brightness, in-section texture, blur and noise.
  Optional section artefacts (black missing sections, step misalignments).
* :func:`synth_lm`: one neuron as a random branching SWC tree in DIADEM conventions (x, y in
  pixels, z in slices, radius in x pixels), rendered as a fluorescence stack (bright tubes,
  PSF blur elongated in z, Poisson and read noise, near-zero background) with its voxel mask.

Each generator has a config model (:class:`SynthEMConfig`, :class:`SynthLMConfig`) whose fields
are exactly the function's keyword arguments: ``synth_em(**config.model_dump())``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cc3d
import fastremap
import numpy as np
from pydantic import Field
from scipy import ndimage as ndi

from neuroray.config import StrictModel
from neuroray.errors import ConfigError
from neuroray.platform.swc import AXON, SWCTree, rasterize

Triple = tuple[float, float, float]
Shape = tuple[int, int, int]


# --------------------------------------------------------------------------- results
@dataclass(frozen=True, eq=False)
class SynthEM:
    """A synthetic EM volume and its ground truth, all z, y, x."""

    raw: np.ndarray  # uint8 image
    labels: np.ndarray  # uint32 neuron ids 1..n (0 only on membranes when boundary_gap)
    mito: np.ndarray  # bool mitochondria, each blob inside one neuron and off its membrane
    membrane: np.ndarray  # bool, separates every pair of touching ids (see synth_em)
    voxel_size: Triple  # nm, z, y, x
    missing_sections: tuple[int, ...]  # z of raw sections blanked to 0 (labels kept)
    misalignments: tuple[tuple[int, int, int], ...]  # (z, dy, dx): sections >= z shifted


@dataclass(frozen=True, eq=False)
class SynthLM:
    """A synthetic single-neuron fluorescence stack, its SWC tree and the tree's voxel mask."""

    image: np.ndarray  # uint8 z, y, x
    tree: SWCTree  # coords="voxel": x, y pixels, z slice index, radius in x pixels
    mask: np.ndarray  # bool, rasterize(tree, image.shape, voxel_size)
    voxel_size: Triple  # nm, z, y, x


# --------------------------------------------------------------------------- configs
class SynthEMConfig(StrictModel):
    """Keyword arguments of :func:`synth_em`; see it for their meaning."""

    shape: Shape = (64, 256, 256)
    seed: int = 0
    voxel_size: Triple = (40.0, 8.0, 8.0)
    radius_nm: tuple[float, float] = (50.0, 200.0)
    fill: float = Field(0.6, gt=0.0, le=1.0)
    branch_prob: float = Field(0.04, ge=0.0, le=0.5)
    mito_prob: float = Field(0.06, ge=0.0, le=1.0)
    noise: float = Field(8.0, ge=0.0)
    missing_sections: int = Field(0, ge=0)
    misaligned_sections: int = Field(0, ge=0)
    max_misalignment_px: int = Field(8, ge=1)
    boundary_gap: bool = False


class SynthLMConfig(StrictModel):
    """Keyword arguments of :func:`synth_lm`; see it for their meaning."""

    shape: Shape = (64, 256, 256)
    seed: int = 0
    voxel_size: Triple = (1000.0, 330.0, 330.0)
    radius_px: tuple[float, float] = (1.0, 2.5)
    length_um: float | None = None
    step_um: float = Field(2.0, gt=0.0)
    branch_prob: float = Field(0.08, ge=0.0, le=0.5)
    twig_um: float = Field(12.0, gt=0.0)
    psf_sigma_nm: Triple = (800.0, 300.0, 300.0)
    brightness: float = Field(170.0, gt=0.0, le=255.0)
    photons_per_level: float = Field(1.0, gt=0.0)
    background: float = Field(0.15, ge=0.0)
    read_noise: float = Field(0.4, ge=0.0)


# --------------------------------------------------------------------------- random trees
def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _turn(rng: np.random.Generator, direction: np.ndarray, angle: float) -> np.ndarray:
    """``direction`` rotated by ``angle`` radians towards a random perpendicular."""
    perp = _unit(np.cross(direction, _unit(rng.standard_normal(3))))
    return _unit(direction * np.cos(angle) + perp * np.sin(angle))


def _grow_tree(
    rng: np.random.Generator,
    start: np.ndarray,
    directions: Sequence[np.ndarray],
    radius: float,
    *,
    lo: np.ndarray,
    hi: np.ndarray,
    step: float,
    wiggle: float,
    branch_prob: float,
    radius_min: float,
    length_budget: float,
    branch_length: float | None = None,
    max_nodes: int = 4000,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Persistent random walks from ``start`` that branch, stopping at the box [lo, hi).

    Returns z, y, x positions, parent row indices and radii, in the units of ``start``. A
    ``step`` of 0 means "one current radius", so tubes look smooth at any size. Side branches
    run until they leave the box or, with ``branch_length``, for an exponentially distributed
    length of that mean (short terminal twigs, as on LM axons).
    """
    positions, parents, radii = [start.astype(np.float64)], [-1], [radius]
    arms = [(0, _unit(np.asarray(d, dtype=np.float64)), radius, np.inf) for d in directions]
    length = 0.0
    while arms and len(positions) < max_nodes and length < length_budget:
        row, direction, r, arm_left = arms.pop()
        while len(positions) < max_nodes and length < length_budget and arm_left > 0:
            length_of_step = step if step > 0 else r
            direction = _unit(direction + wiggle * rng.standard_normal(3))
            nxt = positions[row] + direction * length_of_step
            if np.any(nxt < lo) or np.any(nxt >= hi):
                break
            r = float(np.clip(r * np.exp(0.05 * rng.standard_normal()), radius_min, radius))
            positions.append(nxt)
            parents.append(row)
            radii.append(r)
            row = len(positions) - 1
            length += length_of_step
            arm_left -= length_of_step
            if rng.random() < branch_prob:
                child_r = max(radius_min, 0.75 * r)
                child_len = np.inf if branch_length is None else rng.exponential(branch_length)
                child_dir = _turn(rng, direction, rng.uniform(0.5, 1.2))
                arms.append((row, child_dir, child_r, child_len))
    return np.asarray(positions), np.asarray(parents, dtype=np.int64), np.asarray(radii)


# --------------------------------------------------------------------------- EM
def synth_em(
    shape: Sequence[int] = (64, 256, 256),
    seed: int = 0,
    voxel_size: Sequence[float] = (40.0, 8.0, 8.0),
    *,
    radius_nm: Sequence[float] = (50.0, 200.0),
    fill: float = 0.6,
    branch_prob: float = 0.04,
    mito_prob: float = 0.06,
    noise: float = 8.0,
    missing_sections: int = 0,
    misaligned_sections: int = 0,
    max_misalignment_px: int = 8,
    boundary_gap: bool = False,
) -> SynthEM:
    """A dense EM-like volume with neuron instance labels, membranes and mitochondria.

    Neurites are branching random-walk tubes (radii drawn from ``radius_nm``, in physical space,
    so anisotropic ``voxel_size`` only changes the sampling) added until they occupy ``fill`` of
    the volume; every other voxel joins the nearest tube (a Voronoi fill in nanometres), so
    neurites touch with no gap, and ids are made connected and consecutive from 1 (cc3d, 6-conn).
    ``membrane`` marks both voxels of every in-section (y, x) contact between two ids and the lower
    voxel of every contact across sections (the slanted membrane's projection into that
    section), so of any two face neighbours with different ids at least one is membrane.
    ``boundary_gap=True`` sets membrane voxels to 0 (gala-style ground truth, about a fifth of the
    voxels at the defaults): then no two face neighbours carry different non-zero ids.
    ``mito_prob`` is the chance per tube node of a mitochondrion. ``missing_sections`` raw
    sections are set to 0 (labels untouched); ``misaligned_sections`` step misalignments shift
    every section from a random z on by up to ``max_misalignment_px`` in y and x, in raw, labels,
    mito and membrane alike (the labels follow the image, as annotated data would).
    """
    shape_t = _shape3(shape)
    size = np.asarray(_triple(voxel_size, "voxel_size"), dtype=np.float64)
    r_lo, r_hi = _range(radius_nm, "radius_nm")
    if missing_sections > shape_t[0] or misaligned_sections >= shape_t[0]:
        raise ConfigError(
            f"cannot place {missing_sections} missing and {misaligned_sections} misaligned "
            f"sections in a volume of {shape_t[0]} sections; lower them or add sections"
        )
    rng = np.random.default_rng(seed)
    extent = np.asarray(shape_t) * size  # nm
    margin = 2 * r_hi
    lo, hi = -margin - size / 2, extent + margin - size / 2

    # 1. branching tubes until they fill the volume (tube volume counted inside the box only)
    seeds = np.zeros(shape_t, dtype=np.uint32)
    mito_host = np.zeros(shape_t, dtype=np.uint32)
    box_volume = float(np.prod(extent))
    filled, label = 0.0, 0
    while filled < fill * box_volume and label < 10_000:
        label += 1
        start = rng.uniform(0, 1, 3) * extent
        direction = _unit(rng.standard_normal(3))
        radius = float(rng.uniform(r_lo, r_hi))
        zyx, parent, radii = _grow_tree(
            rng,
            start,
            [direction, -direction],
            radius,
            lo=lo,
            hi=hi,
            step=0.0,
            wiggle=0.15,
            branch_prob=branch_prob,
            radius_min=r_lo,
            length_budget=8 * float(np.linalg.norm(extent)),
        )
        tree = SWCTree.from_arrays(zyx, parent, radii, AXON)
        rasterize(tree, shape_t, size, coords="physical", unit_nm=1.0, out=seeds, value=label)
        inside = np.all((zyx >= 0) & (zyx < extent), axis=1)
        filled += float(np.sum(np.pi * radii[inside] ** 2 * radii[inside]))
        _add_mitochondria(rng, tree, shape_t, size, mito_prob, mito_host, label)

    # 2. Voronoi fill (nm) from connected tube pieces; drop crumbs so no id is a few voxels
    pieces = cc3d.dust(cc3d.connected_components(seeds, connectivity=6), threshold=8)
    if not pieces.any():  # a volume too small to hold a whole tube piece: one object
        pieces[...] = 1
    nearest = ndi.distance_transform_edt(
        pieces == 0, sampling=size, return_distances=False, return_indices=True
    )
    tube_of_voxel = seeds[tuple(nearest)]
    labels = cc3d.connected_components(pieces[tuple(nearest)], connectivity=6)
    del nearest, pieces
    labels = _absorb_crumbs(labels.astype(np.uint32), min_voxels=64)

    # 3. membranes between different ids, mitochondria inside their own neurite
    membrane_in_plane = _boundaries(labels, axes=(1, 2))
    membrane = membrane_in_plane | _boundaries(labels, axes=(0,), both_sides=False)
    mito = (mito_host > 0) & (mito_host == tube_of_voxel)
    mito &= ~ndi.binary_dilation(membrane, structure=_in_plane_cross())
    del mito_host, tube_of_voxel

    # 4. the image
    raw = _render_em(rng, labels, membrane, membrane_in_plane, mito, noise)
    del membrane_in_plane
    if boundary_gap:
        labels[membrane] = 0
        labels, _ = fastremap.renumber(labels, preserve_zero=True, in_place=True)
        labels = labels.astype(np.uint32, copy=False)

    # 5. section artefacts
    missing = tuple(
        sorted(int(z) for z in rng.choice(shape_t[0], size=missing_sections, replace=False))
    )
    raw[list(missing)] = 0
    shifts = []
    if misaligned_sections:
        for z in sorted(rng.choice(np.arange(1, shape_t[0]), misaligned_sections, replace=False)):
            dy, dx = (
                int(v) for v in rng.integers(-max_misalignment_px, max_misalignment_px + 1, 2)
            )
            for array in (raw, labels, mito, membrane):
                _shift_sections(array, int(z), dy, dx)
            shifts.append((int(z), dy, dx))
    return SynthEM(
        raw=raw,
        labels=labels,
        mito=mito,
        membrane=membrane,
        voxel_size=tuple(float(v) for v in size),
        missing_sections=missing,
        misalignments=tuple(shifts),
    )


def _add_mitochondria(
    rng: np.random.Generator,
    tree: SWCTree,
    shape: Shape,
    size: np.ndarray,
    mito_prob: float,
    out: np.ndarray,
    label: int,
) -> None:
    """Short capsules along some tube edges, about half the tube's radius, tagged with its id."""
    edges = tree.edges()
    chosen = edges[rng.random(len(edges)) < mito_prob]
    if not len(chosen):
        return
    zyx = tree.zyx
    centre = zyx[chosen[:, 0]]
    along = zyx[chosen[:, 1]] - centre
    along /= np.maximum(np.linalg.norm(along, axis=1, keepdims=True), 1e-9)
    host_r = tree.radii[chosen[:, 0]]
    radius = np.maximum(host_r * rng.uniform(0.35, 0.55, len(chosen)), 1.5 * size[2])
    half = radius * rng.uniform(1.0, 2.5, len(chosen))
    ends = np.stack([centre - along * half[:, None], centre + along * half[:, None]], axis=1)
    parent = np.full(2 * len(chosen), -1, dtype=np.int64)
    parent[1::2] = np.arange(0, 2 * len(chosen), 2)  # each capsule: a root and one child
    capsules = SWCTree.from_arrays(ends.reshape(-1, 3), parent, np.repeat(radius, 2))
    rasterize(capsules, shape, size, coords="physical", unit_nm=1.0, out=out, value=label)


def _boundaries(labels: np.ndarray, axes: Sequence[int], both_sides: bool = True) -> np.ndarray:
    """Voxels with a face neighbour along ``axes`` of another id (or only the lower voxel)."""
    boundary = np.zeros(labels.shape, dtype=bool)
    for axis in axes:
        lower = [slice(None)] * 3
        upper = [slice(None)] * 3
        lower[axis], upper[axis] = slice(None, -1), slice(1, None)
        differs = labels[tuple(lower)] != labels[tuple(upper)]
        boundary[tuple(lower)] |= differs
        if both_sides:
            boundary[tuple(upper)] |= differs
    return boundary


def _absorb_crumbs(labels: np.ndarray, min_voxels: int) -> np.ndarray:
    """Merge objects smaller than ``min_voxels`` into a touching neighbour; ids become 1..n.

    The Voronoi fill leaves a few voxel-sized fragments where cells meet at a slant; growing the
    neighbours into them (one face step per round, only at the fragments) is cheap and exact.
    """
    counts = np.bincount(labels.ravel())
    small = np.flatnonzero((counts > 0) & (counts < min_voxels))
    if small.size and small.size < np.count_nonzero(counts):
        fastremap.mask(labels, small.tolist(), in_place=True)  # fragments become 0
        upper = np.asarray(labels.shape) - 1
        for _ in range(2 * min_voxels):
            holes = np.argwhere(labels == 0)
            if not holes.size:
                break
            found = np.zeros(len(holes), dtype=labels.dtype)
            for axis in range(3):
                for step in (-1, 1):
                    neighbour = holes.copy()
                    neighbour[:, axis] = np.clip(neighbour[:, axis] + step, 0, upper[axis])
                    value = labels[tuple(neighbour.T)]
                    found = np.where(found == 0, value, found)
            labels[tuple(holes.T)] = found
    labels, _ = fastremap.renumber(labels, in_place=True)
    return labels.astype(np.uint32, copy=False)


def _in_plane_cross() -> np.ndarray:
    structure = np.zeros((1, 3, 3), dtype=bool)
    structure[0, 1, :] = structure[0, :, 1] = True
    return structure


def _render_em(
    rng: np.random.Generator,
    labels: np.ndarray,
    membrane: np.ndarray,
    membrane_in_plane: np.ndarray,
    mito: np.ndarray,
    noise: float,
) -> np.ndarray:
    """Grey cytoplasm (brightness per neuron) with texture, dark membranes and mitochondria.

    Membranes cut across a section are dark; where two objects meet only between sections (a
    membrane lying slanted in the section) it is a lighter smear, as in serial-section EM.
    """
    texture = ndi.gaussian_filter(rng.standard_normal(labels.shape, dtype=np.float32), (0, 1, 1))
    texture /= max(float(texture.std()), 1e-6)
    brightness = rng.uniform(150.0, 195.0, int(labels.max()) + 1).astype(np.float32)
    image = brightness[labels] + 9.0 * texture
    mito_edge = mito & ~ndi.binary_erosion(mito, structure=_in_plane_cross())
    image[mito] = 110.0 + 8.0 * texture[mito]
    image[mito_edge] = 80.0
    slanted = membrane & ~membrane_in_plane
    image[slanted] = 0.5 * image[slanted] + 0.5 * (60.0 + 6.0 * texture[slanted])
    image[membrane_in_plane] = 50.0 + 6.0 * texture[membrane_in_plane]
    image = ndi.gaussian_filter(image, (0, 0.7, 0.7))
    if noise > 0:
        image += rng.normal(0.0, noise, image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _shift_sections(array: np.ndarray, z: int, dy: int, dx: int) -> None:
    """Translate sections z.. by (dy, dx) in place, repeating edge values into the gap."""
    py, px = abs(dy), abs(dx)
    padded = np.pad(array[z:], ((0, 0), (py, py), (px, px)), mode="edge")
    height, width = array.shape[1:]
    array[z:] = padded[:, py - dy : py - dy + height, px - dx : px - dx + width]


# --------------------------------------------------------------------------- LM
def synth_lm(
    shape: Sequence[int] = (64, 256, 256),
    seed: int = 0,
    voxel_size: Sequence[float] = (1000.0, 330.0, 330.0),
    *,
    radius_px: Sequence[float] = (1.0, 2.5),
    length_um: float | None = None,
    step_um: float = 2.0,
    branch_prob: float = 0.08,
    twig_um: float = 12.0,
    psf_sigma_nm: Sequence[float] = (800.0, 300.0, 300.0),
    brightness: float = 170.0,
    photons_per_level: float = 1.0,
    background: float = 0.15,
    read_noise: float = 0.4,
) -> SynthLM:
    """A single-neuron confocal-like stack (DIADEM OP style) with its SWC tree and mask.

    The tree starts near the centre and grows fibres (mostly lateral, as OP axons are) totalling
    ``length_um`` (default: twice the stack's x-y diagonal), nodes ``step_um`` apart, radii from
    ``radius_px[1]`` tapering to ``radius_px[0]`` x pixels; with probability ``branch_prob`` per
    node a side twig of mean length ``twig_um`` sprouts; long side fibres are added from random
    nodes until the length is spent. The image is the mask
    with slowly varying brightness (varicosities), blurred by a Gaussian PSF (``psf_sigma_nm``,
    z, y, x), scaled so bright fibres reach about ``brightness``, then Poisson noise
    (``photons_per_level`` photons per grey level) on a ``background`` of a fraction of a grey
    level and Gaussian read noise: the background is near zero, like the DIADEM stacks.
    """
    shape_t = _shape3(shape)
    size = np.asarray(_triple(voxel_size, "voxel_size"), dtype=np.float64)
    r_min, r_max = _range(radius_px, "radius_px")
    rng = np.random.default_rng(seed)
    extent_um = np.asarray(shape_t) * size / 1000.0
    margin = np.minimum(extent_um * 0.04, 4.0)
    lo, hi = margin - size / 2000.0, extent_um - margin - size / 2000.0
    if length_um is None:
        length_um = 2.0 * float(np.hypot(extent_um[1], extent_um[2]))
    start = extent_um * rng.uniform(0.35, 0.65, 3)
    direction = _unit(rng.standard_normal(3) * [0.3, 1.0, 1.0])
    positions, parents, radii = _grow_tree(
        rng,
        start,
        [direction, -direction],
        r_max,
        lo=lo,
        hi=hi,
        step=step_um,
        wiggle=0.2,
        branch_prob=branch_prob,
        radius_min=r_min,
        length_budget=length_um,
        branch_length=twig_um,
    )
    # keep growing side branches from random nodes until the length budget is spent
    for _ in range(200):
        grown = float(np.sum(np.linalg.norm(positions[1:] - positions[parents[1:]], axis=1)))
        if grown >= 0.95 * length_um:
            break
        row = int(rng.integers(len(positions)))
        side = _unit(rng.standard_normal(3) * [0.3, 1.0, 1.0])
        more, more_parents, more_radii = _grow_tree(
            rng,
            positions[row],
            [side],
            max(r_min, 0.75 * radii[row]),
            lo=lo,
            hi=hi,
            step=step_um,
            wiggle=0.2,
            branch_prob=branch_prob,
            radius_min=r_min,
            length_budget=length_um - grown,
            branch_length=twig_um,
        )
        offset = len(positions) - 1  # row 0 of the side tree is the existing node ``row``
        more_parents = np.where(more_parents[1:] == 0, row, more_parents[1:] + offset)
        positions = np.concatenate([positions, more[1:]])
        parents = np.concatenate([parents, more_parents])
        radii = np.concatenate([radii, more_radii[1:]])
    voxel_zyx = positions * 1000.0 / size
    tree = SWCTree.from_arrays(voxel_zyx, parents, radii, AXON)
    mask = rasterize(tree, shape_t, size)

    # smooth brightness variation: coarse noise upsampled, in [0.5, 1]
    coarse = rng.uniform(0.5, 1.0, tuple(max(2, s // 16) for s in shape_t))
    factors = [s / c for s, c in zip(shape_t, coarse.shape, strict=True)]
    modulation = ndi.zoom(coarse, factors, order=1, grid_mode=True, mode="nearest")
    density = mask * modulation.astype(np.float32)
    sigma = np.asarray(_triple(psf_sigma_nm, "psf_sigma_nm")) / size
    blurred = ndi.gaussian_filter(density, sigma)
    peak = float(np.quantile(blurred[mask], 0.95)) if mask.any() else 1.0
    expected = blurred * (brightness / max(peak, 1e-6)) + background
    counts = rng.poisson(expected * photons_per_level) / photons_per_level
    image = counts + rng.normal(0.0, read_noise, shape_t)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return SynthLM(image=image, tree=tree, mask=mask, voxel_size=tuple(float(v) for v in size))


# --------------------------------------------------------------------------- argument checks
def _shape3(shape: Sequence[int]) -> Shape:
    values = tuple(int(s) for s in shape)
    if len(values) != 3 or min(values) < 4:
        raise ConfigError(f"shape must be three sizes (z, y, x), each >= 4; got {tuple(shape)}")
    return values  # type: ignore[return-value]


def _triple(values: Sequence[float], name: str) -> Triple:
    out = tuple(float(v) for v in values)
    if len(out) != 3 or min(out) <= 0:
        raise ConfigError(f"{name} must be three positive numbers (nm, z, y, x); got {values}")
    return out  # type: ignore[return-value]


def _range(values: Sequence[float], name: str) -> tuple[float, float]:
    low, high = (float(v) for v in values)
    if not 0 < low <= high:
        raise ConfigError(f"{name} must be (low, high) with 0 < low <= high; got {values}")
    return low, high


# --------------------------------------------------------------------------- files on disk
def _h5_holds(path: Path, arrays: dict[str, np.ndarray]) -> bool:
    """Whether the HDF5 file at ``path`` already holds exactly these datasets."""
    import h5py

    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            return all(name in f and np.array_equal(f[name][()], a) for name, a in arrays.items())
    except OSError:
        return False


def write_synthetic(
    kind: str, directory: str | Path, *, shape: Sequence[int] | None = None, seed: int = 0
) -> dict[str, str]:
    """Write a synthetic volume the way real data arrives, and return its URLs by name.

    EM: one HDF5 file with ``raw``, ``labels`` and ``mito`` datasets and a ``resolution_nm_zyx``
    attribute (like the files in ``shared/data/em``). LM: a TIFF stack with its spacing in the
    description plus the gold-standard SWC beside it (like the DIADEM stacks).
    Files that already hold exactly this content are left alone, so what was ingested from
    them before still matches its fingerprint (size and modification time).
    """
    import h5py
    import tifffile

    from neuroray.platform.swc import write_swc

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if kind == "em":
        em = synth_em(**({"shape": shape} if shape else {}), seed=seed)
        path = directory / "synth_em.h5"
        urls = {name: f"{path}#{name}" for name in ("raw", "labels", "mito")}
        arrays = {"raw": em.raw, "labels": em.labels, "mito": em.mito.astype(np.uint8)}
        if _h5_holds(path, arrays):
            return urls
        tmp = path.with_suffix(".h5.tmp")
        with h5py.File(tmp, "w") as f:
            for name, array in (("raw", em.raw), ("labels", em.labels), ("mito", em.mito)):
                f.create_dataset(
                    name,
                    data=array.astype(np.uint8) if array.dtype == bool else array,
                    chunks=True,
                    compression="gzip",
                )
            f.attrs["resolution_nm_zyx"] = np.asarray(em.voxel_size)
            f.attrs["axis_order"] = "zyx"
            f.attrs["source"] = f"neuroray synth_em seed={seed}"
        tmp.replace(path)
        return urls
    if kind == "lm":
        lm = synth_lm(**({"shape": shape} if shape else {}), seed=seed)
        image_path = directory / "synth_lm.tif"
        spacing = [v / 1000 for v in lm.voxel_size]
        if not (image_path.is_file() and np.array_equal(tifffile.imread(image_path), lm.image)):
            tifffile.imwrite(
                image_path, lm.image, metadata={"spacing_um_zyx": spacing, "axes": "ZYX"}
            )
        swc_path = directory / "synth_lm.swc"
        tmp = swc_path.with_suffix(".swc.tmp")
        write_swc(lm.tree, tmp, comment=f"neuroray synth_lm seed={seed}; x,y px, z slice")
        if swc_path.is_file() and swc_path.read_bytes() == tmp.read_bytes():
            tmp.unlink()
        else:
            tmp.replace(swc_path)
        return {"image": str(image_path), "swc": str(swc_path)}
    raise ConfigError(f"unknown synthetic kind {kind!r}; use 'em' or 'lm'")
