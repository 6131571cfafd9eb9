"""Light-microscopy training pairs: a TIFF stack + its gold SWC -> image and label layers.

The image is copied as it is (uint8 stays uint8); the label layer is the SWC rasterised on the
image's own voxel grid by :func:`neuroray.platform.swc.rasterize`: a ball per node and a cone per
edge, measured in nanometres, so the stack's anisotropy shapes the mask (DIADEM OP stacks: 329.6
nm pixels and 998.8 nm slices, read from the TIFF description; a radius of r x-pixels spans
r * 0.33 slices in z). Gold radii are thin (OP_2 even stores 0 for "unknown"), so radii below
``radius_floor_px`` (in x pixels) are raised to it: this is the label definition, and it moves
Dice a lot (at floor 2 px the neuron covers 0.01-0.1% of an OP stack).

Both layers are written with :func:`neuroray.platform.ingest.ingest` (precomputed by default, or
zarr for a ``*.zarr`` destination), with a manifest whose foreground fractions let the
:class:`~neuroray.platform.sampler.CropSampler` draw crops that contain the neuron, and are
served by the same :class:`~neuroray.platform.server.ServerPool` as EM layers. Labels are 1 on the
neuron, 0 elsewhere (uint32 segmentation).

:func:`prepare_lm_stacks` puts several stacks into one pair of layers, one after another along z
with ``gap_z`` empty slices between them, so one ServerPool serves a whole training set and no
crop at most ``gap_z`` deep ever mixes two stacks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neuroray.errors import VolumeError
from neuroray.platform.box import Box
from neuroray.platform.ingest import ingest
from neuroray.platform.provenance import (
    check_resume,
    file_identity,
    local_dir,
    write_fingerprint,
)
from neuroray.platform.storage import put_atomic
from neuroray.platform.swc import rasterize, read_swc
from neuroray.platform.volume import Volume, open_volume

DEFAULT_RADIUS_FLOOR_PX = 2.0
DEFAULT_CHUNK_SHAPE = (32, 128, 128)


class ArrayVolume(Volume):
    """A read-only in-memory array as a Volume, so ingest can chunk it like any other source."""

    format_name = "array"

    def __init__(self, data: np.ndarray, voxel_size: Sequence[float], name: str = "array") -> None:
        self._data = np.asarray(data)
        super().__init__(
            f"<{name}>",
            shape=self._data.shape,
            dtype=self._data.dtype,
            voxel_size=voxel_size,
            chunk_shape=self._data.shape,
        )

    @classmethod
    def matches(cls, url: str) -> bool:
        return False

    @classmethod
    def open(cls, url: str, mode: str = "r", **options: Any) -> Volume:
        raise VolumeError("in-memory arrays have no URL to open")

    def _read(self, box: Box) -> np.ndarray:
        return np.asarray(self._data[box.slices])[None]

    def content_sha256(self) -> str:
        """The array's identity for ingest's fingerprint (it has no file to stat)."""
        return hashlib.sha256(np.ascontiguousarray(self._data).data).hexdigest()


def label_mask(
    swc: str | os.PathLike[str],
    shape_zyx: Sequence[int],
    voxel_size: Sequence[float],
    *,
    radius_floor_px: float = DEFAULT_RADIUS_FLOOR_PX,
) -> np.ndarray:
    """The bool label mask of a gold SWC (voxel coordinates) on a stack's grid (see module doc)."""
    _check_radius_floor(radius_floor_px)
    tree = read_swc(swc, allow_zero_radius=True)
    mask = rasterize(tree, shape_zyx, voxel_size, radius_floor=radius_floor_px)
    if not mask.any():
        raise VolumeError(
            f"{swc}: no node of this reconstruction lies inside its stack (z, y, x shape "
            f"{tuple(shape_zyx)}); check that the SWC belongs to this stack and is in voxel units"
        )
    return mask


def _check_radius_floor(radius_floor_px: float) -> None:
    if not (math.isfinite(radius_floor_px) and radius_floor_px >= 0):
        raise VolumeError(f"radius floor must be a finite number >= 0 px, got {radius_floor_px}")


def _start(
    dst: Path,
    pairs: Sequence[tuple[str | os.PathLike[str], str | os.PathLike[str]]],
    settings: dict[str, Any],
    overwrite: bool,
) -> None:
    """Check ``dst`` before any work: the same stacks and settings resume; others are refused
    unless ``overwrite``. Records the fingerprint the layers are about to be written with."""
    for tif, swc in pairs:
        for path in (tif, swc):
            if not Path(path).is_file():
                raise VolumeError(f"{path} does not exist")
    fingerprint = {
        "kind": "lm_stacks",
        "stacks": [{"tif": file_identity(t), "swc": file_identity(s)} for t, s in pairs],
        **settings,
    }
    if "://" in str(dst):
        raise VolumeError(f"{dst}: LM layers are written to a local folder only")
    directory = local_dir(dst)
    if not overwrite:
        check_resume(directory, fingerprint, what=str(dst), overwrite_hint="pass --overwrite")
    write_fingerprint(directory, fingerprint)


def _open_stack(tif: str | os.PathLike[str], voxel_size: Sequence[float] | None) -> Volume:
    volume = open_volume(tif, voxel_size=voxel_size)
    if volume.num_channels != 1:
        raise VolumeError(f"{tif}: expected a single-channel stack, found {volume.num_channels}")
    if volume.voxel_size_defaulted:
        raise VolumeError(
            f"{tif} carries no voxel size (no spacing in its description or resolution tags); "
            "pass voxel_size=(z, y, x) in nm so the SWC is rasterised with the real anisotropy"
        )
    return volume


def _write_layers(
    image: Volume,
    labels: np.ndarray,
    dst_dir: Path,
    *,
    format: str,
    chunk_shape: Sequence[int],
    overwrite: bool,
    progress: bool,
) -> dict[str, str]:
    suffix = ".zarr" if format == "zarr" else ""
    if format not in ("precomputed", "zarr"):
        raise VolumeError(f"format must be 'precomputed' or 'zarr', got {format!r}")
    urls = {"image": str(dst_dir / f"image{suffix}"), "labels": str(dst_dir / f"labels{suffix}")}
    chunks = tuple(int(c) for c in chunk_shape)
    ingest(
        image,
        urls["image"],
        chunk_shape=chunks,
        labels=False,
        overwrite=overwrite,
        progress=progress,
    )
    ingest(
        ArrayVolume(labels.astype(np.uint8, copy=False), image.voxel_size, "labels"),
        urls["labels"],
        chunk_shape=chunks,
        labels=True,
        overwrite=overwrite,
        progress=progress,
    )
    return urls


def prepare_lm_stack(
    tif: str | os.PathLike[str],
    swc: str | os.PathLike[str],
    dst_dir: str | os.PathLike[str],
    *,
    radius_floor_px: float = DEFAULT_RADIUS_FLOOR_PX,
    voxel_size: Sequence[float] | None = None,
    chunk_shape: Sequence[int] = DEFAULT_CHUNK_SHAPE,
    format: str = "precomputed",
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, str]:
    """Write ``dst_dir/image`` and ``dst_dir/labels`` for one stack; return their URLs.

    ``voxel_size`` (nm, z, y, x) overrides the TIFF's; SWC coordinates are voxel indices (x, y
    pixels, z slice) and radii x-pixels, as in DIADEM / BigNeuron gold standards. The returned
    dict is what ``ServerPool(layers=...)`` and ``DataSettings(image=, labels=)`` take. A JSON
    ``dst_dir/lm_stack.json`` records the sources, voxel size, radius floor and foreground fraction.
    """
    dst = Path(dst_dir)
    _check_radius_floor(radius_floor_px)
    image = _open_stack(tif, voxel_size)
    _start(
        dst,
        [(tif, swc)],
        {
            "radius_floor_px": radius_floor_px,
            "voxel_size": list(image.voxel_size),
            "chunk_shape": list(chunk_shape),
            "format": format,
        },
        overwrite,
    )
    labels = label_mask(swc, image.shape, image.voxel_size, radius_floor_px=radius_floor_px)
    urls = _write_layers(
        image,
        labels,
        dst,
        format=format,
        chunk_shape=chunk_shape,
        overwrite=overwrite,
        progress=progress,
    )
    _write_record(
        dst,
        {
            "layers": urls,
            "stacks": [
                {
                    "name": Path(tif).stem,
                    "tif": str(tif),
                    "swc": str(swc),
                    "box": image.bounds.to_list(),
                    "foreground_fraction": float(labels.mean()),
                }
            ],
            "voxel_size_nm_zyx": list(image.voxel_size),
            "radius_floor_px": radius_floor_px,
        },
    )
    return urls


@dataclass
class LMLayers:
    """Image and label layers holding several stacks, and where each stack lies in them."""

    image: str
    labels: str
    stacks: dict[str, Box] = field(default_factory=dict)
    voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @property
    def layers(self) -> dict[str, str]:
        """``{"image": url, "labels": url}`` for ServerPool / DataSettings."""
        return {"image": self.image, "labels": self.labels}

    def roi(self, name: str) -> list[int]:
        """A stack's box as ``[z0, y0, x0, z1, y1, x1]`` (a SamplerConfig roi)."""
        return self.stacks[name].to_list()


def prepare_lm_stacks(
    pairs: Sequence[tuple[str | os.PathLike[str], str | os.PathLike[str]]],
    dst_dir: str | os.PathLike[str],
    *,
    gap_z: int = 32,
    radius_floor_px: float = DEFAULT_RADIUS_FLOOR_PX,
    voxel_size: Sequence[float] | None = None,
    chunk_shape: Sequence[int] = DEFAULT_CHUNK_SHAPE,
    format: str = "precomputed",
    overwrite: bool = False,
    progress: bool = False,
) -> LMLayers:
    """Several (tif, swc) stacks one after another along z, ``gap_z`` zero slices apart.

    Stacks smaller in y or x than the largest are zero-padded at the end. All stacks must share a
    voxel size (or pass ``voxel_size``). Choose ``gap_z`` >= the crop depth so no crop mixes two
    stacks. Stack names are the TIFF file stems (``OP_1``...).
    """
    if not pairs:
        raise VolumeError("prepare_lm_stacks needs at least one (tif, swc) pair")
    if gap_z < 0:
        raise VolumeError(f"gap_z must be >= 0 slices, got {gap_z}")
    _check_radius_floor(radius_floor_px)
    volumes = [_open_stack(tif, voxel_size) for tif, _ in pairs]
    sizes = {v.voxel_size for v in volumes}
    if len(sizes) > 1:
        raise VolumeError(
            f"stacks have different voxel sizes {sorted(sizes)}; pass voxel_size= to force one, "
            "or prepare them separately"
        )
    names = [Path(tif).stem for tif, _ in pairs]
    if len(set(names)) != len(names):
        raise VolumeError(f"stack names {names} repeat; give the TIFFs distinct file names")
    size = volumes[0].voxel_size
    _start(
        Path(dst_dir),
        pairs,
        {
            "gap_z": gap_z,
            "radius_floor_px": radius_floor_px,
            "voxel_size": list(size),
            "chunk_shape": list(chunk_shape),
            "format": format,
        },
        overwrite,
    )
    ny = max(v.shape[1] for v in volumes)
    nx = max(v.shape[2] for v in volumes)
    nz = sum(v.shape[0] for v in volumes) + gap_z * (len(volumes) - 1)
    dtype = np.result_type(*[v.dtype for v in volumes])
    image = np.zeros((nz, ny, nx), dtype=dtype)
    labels = np.zeros((nz, ny, nx), dtype=np.uint8)
    stacks: dict[str, Box] = {}
    records = []
    z = 0
    for name, volume, (tif, swc) in zip(names, volumes, pairs, strict=True):
        d, h, w = volume.shape
        box = Box((z, 0, 0), (z + d, h, w))
        image[box.slices] = volume[:, :, :]
        mask = label_mask(swc, volume.shape, size, radius_floor_px=radius_floor_px)
        labels[box.slices] = mask
        stacks[name] = box
        records.append(
            {
                "name": name,
                "tif": str(tif),
                "swc": str(swc),
                "box": box.to_list(),
                "foreground_fraction": float(mask.mean()),
            }
        )
        z += d + gap_z
    dst = Path(dst_dir)
    urls = _write_layers(
        ArrayVolume(image, size, "image"),
        labels,
        dst,
        format=format,
        chunk_shape=chunk_shape,
        overwrite=overwrite,
        progress=progress,
    )
    _write_record(
        dst,
        {
            "layers": urls,
            "stacks": records,
            "gap_z": gap_z,
            "voxel_size_nm_zyx": list(size),
            "radius_floor_px": radius_floor_px,
        },
    )
    return LMLayers(urls["image"], urls["labels"], stacks, size)


def _write_record(dst: Path, record: dict[str, Any]) -> None:
    put_atomic(
        "file://" + str(dst.resolve()), "lm_stack.json", json.dumps(record, indent=1).encode()
    )


def read_lm_record(dst_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON record :func:`prepare_lm_stack` / :func:`prepare_lm_stacks` left in ``dst_dir``."""
    path = Path(dst_dir) / "lm_stack.json"
    if not path.is_file():
        raise VolumeError(f"{dst_dir} holds no lm_stack.json; run prepare_lm_stack(s) first")
    return json.loads(path.read_text())


def op_pairs(data_dir: str | os.PathLike[str], numbers: Sequence[int]) -> list[tuple[Path, Path]]:
    """The DIADEM OP (tif, swc) pairs of ``data_dir/lm`` (or ``data_dir``) by number, checked."""
    root = Path(data_dir)
    root = root / "lm" if (root / "lm").is_dir() else root
    pairs = [(root / f"OP_{n}.tif", root / f"OP_{n}.swc") for n in numbers]
    missing = [str(p) for pair in pairs for p in pair if not p.is_file()]
    if missing:
        raise VolumeError(f"missing OP files {missing}; see shared/data/README.md")
    return pairs
