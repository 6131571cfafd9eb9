"""One facade over every volume format: ``open_volume(url)`` and ``create_volume(url, ...)``.

Formats are plugins in :data:`VOLUME_FORMATS` (CloudVolume style), one module each in
``neuroray/platform/formats/``: Neuroglancer precomputed (through CloudVolume), zarr v2/v3, HDF5
(``file.h5#dataset``), multi-page TIFF and ``.npy``. URL schemes and remote-access checks live in
:mod:`neuroray.platform.remote`.
Every volume reads and writes numpy arrays in **z, y, x** order (channels first, ``C, z, y, x``,
when a layer has more than one channel). CloudVolume's x, y, z(, c) order is converted here and
nowhere else. Voxel sizes are in nm, z, y, x.

URLs:
- ``precomputed://file:///data/raw``, ``precomputed://gs://bucket/raw``, ``gs://bucket/raw``,
  ``file:///data/raw``, or a local directory holding an ``info`` file;
- ``/data/raw.zarr``, ``zarr://s3://bucket/raw.zarr`` (any fsspec URL), a directory with
  ``zarr.json`` / ``.zarray``;
- ``/data/cube.h5#raw`` (the dataset path after ``#``);
- ``/data/stack.tif`` and ``/data/array.npy``.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from neuroray.errors import VolumeError
from neuroray.platform.box import Box
from neuroray.platform.remote import (
    REMOTE_SCHEMES,
    check_remote_access,
    check_url_scheme,
)
from neuroray.registry import Registry

LayerType = Literal["image", "segmentation"]
VOLUME_FORMATS: Registry[type[Volume]] = Registry("volume format")

SUPPORTED_DTYPES = (
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "int8",
    "int16",
    "int32",
    "int64",
    "float32",
    "float64",
)


def checked_dtype(dtype: Any, url: str) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.name not in SUPPORTED_DTYPES:
        raise VolumeError(
            f"{url}: dtype {dtype.name} is not supported (use one of {', '.join(SUPPORTED_DTYPES)})"
        )
    return dtype


def _default_layer_type(dtype: np.dtype) -> LayerType:
    return "segmentation" if dtype.kind in "ui" and dtype.itemsize >= 4 else "image"


DEFAULT_VOXEL_SIZE = (1.0, 1.0, 1.0)
"""What a volume whose source says nothing about its voxel size is given (``voxel_size_defaulted``
is then True, so ingest can warn and evaluate can take the other layer's)."""


class Volume(ABC):
    """A 3D (optionally multi-channel) array on disk or in a bucket, read and written in z, y, x."""

    format_name: str = ""

    def __init__(
        self,
        url: str,
        *,
        shape: Sequence[int],
        dtype: Any,
        voxel_size: Sequence[float] | None,
        chunk_shape: Sequence[int],
        num_channels: int = 1,
        layer_type: LayerType | None = None,
        writable: bool = False,
    ) -> None:
        self.url = url
        self.shape = tuple(int(s) for s in shape)
        self.dtype = checked_dtype(dtype, url)
        #: True when the source carried no voxel size and 1 x 1 x 1 nm stands in for it
        self.voxel_size_defaulted = voxel_size is None
        self.voxel_size = tuple(float(v) for v in (voxel_size or DEFAULT_VOXEL_SIZE))
        self.chunk_shape = tuple(int(c) for c in chunk_shape)
        self.num_channels = int(num_channels)
        self.layer_type: LayerType = layer_type or _default_layer_type(self.dtype)
        self.writable = writable
        if len(self.shape) != 3 or len(self.voxel_size) != 3 or len(self.chunk_shape) != 3:
            raise VolumeError(
                f"{url}: expected a 3D volume (z, y, x), got shape {self.shape}, "
                f"voxel size {self.voxel_size}, chunks {self.chunk_shape}"
            )
        check_not_empty(self.shape, self.num_channels, url)

    # ------------------------------------------------------------------ format plugin interface
    @classmethod
    @abstractmethod
    def matches(cls, url: str) -> bool:
        """Whether ``url`` names a volume of this format."""

    @classmethod
    @abstractmethod
    def open(cls, url: str, mode: str = "r", **options: Any) -> Volume: ...

    @classmethod
    def create(cls, url: str, **spec: Any) -> Volume:
        raise VolumeError(
            f"{cls.format_name} volumes cannot be created by neuroray; "
            "write to precomputed or zarr instead"
        )

    @abstractmethod
    def _read(self, box: Box) -> np.ndarray:
        """Read ``box`` (inside bounds) as (C, z, y, x)."""

    def _write(self, box: Box, data: np.ndarray) -> None:
        raise VolumeError(f"{self.url}: {self.format_name} volumes are read-only here")

    # ------------------------------------------------------------------ public API
    @property
    def bounds(self) -> Box:
        return Box.from_shape(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.num_channels * self.dtype.itemsize

    def read(self, box: Box) -> np.ndarray:
        """The voxels of ``box``: (z, y, x), or (C, z, y, x) for multi-channel layers."""
        if not self.bounds.contains(box) or box.empty:
            raise VolumeError(f"{self.url}: box {box} is outside the volume's bounds {self.bounds}")
        try:
            data = self._read(box)
        except VolumeError:
            raise
        except Exception as err:  # decoding errors from the storage libraries
            raise VolumeError(
                f"{self.url}: cannot read {box}: {type(err).__name__}: {err}. "
                "A chunk may be corrupt or truncated: rerun its `neuroray data ingest` with "
                "--repair (or --overwrite), or re-write it."
            ) from err
        return data[0] if self.num_channels == 1 else data

    def write(self, box: Box, data: np.ndarray) -> None:
        """Write ``data`` (z, y, x) or (C, z, y, x) into ``box``."""
        if not self.writable:
            raise VolumeError(f"{self.url}: opened read-only; open with mode='r+' to write")
        if not self.bounds.contains(box):
            raise VolumeError(f"{self.url}: box {box} is outside the volume's bounds {self.bounds}")
        data = np.asarray(data)
        if data.ndim == 3:
            data = data[None]
        if data.shape != (self.num_channels, *box.shape):
            raise VolumeError(
                f"{self.url}: cannot write data of shape {data.shape} into {box} "
                f"(expected {(self.num_channels, *box.shape)})"
            )
        self._write(box, data.astype(self.dtype, copy=False))

    def __getitem__(self, key: Any) -> np.ndarray:
        box, squeeze = _box_from_key(key, self.shape)
        data = self.read(box)
        if squeeze:
            index = (slice(None),) * (data.ndim - 3) + tuple(
                0 if s else slice(None) for s in squeeze
            )
            data = data[index]
        return data

    def __setitem__(self, key: Any, value: np.ndarray) -> None:
        box, _ = _box_from_key(key, self.shape)
        self.write(box, np.broadcast_to(value, box.shape) if np.ndim(value) == 0 else value)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self.read(self.bounds)
        return data.astype(dtype) if dtype is not None else data

    def info(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "format": self.format_name,
            "shape_zyx": list(self.shape),
            "num_channels": self.num_channels,
            "dtype": self.dtype.name,
            "voxel_size_nm_zyx": list(self.voxel_size),
            "chunk_shape_zyx": list(self.chunk_shape),
            "layer_type": self.layer_type,
            "size_mb": round(self.nbytes / 1e6, 3),
        }

    def __reduce__(self) -> tuple[Any, ...]:
        # Volumes travel to Ray actors and tasks by URL and reopen there.
        return (open_volume, (self.url, "r+" if self.writable else "r"))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.url!r}, shape={self.shape}, dtype={self.dtype.name}, "
            f"voxel_size={self.voxel_size}, chunks={self.chunk_shape})"
        )


def _box_from_key(key: Any, shape: tuple[int, ...]) -> tuple[Box, list[bool]]:
    """Turn numpy-style indexing (slices and ints, steps of 1) into a box."""
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is Ellipsis for k in key):
        i = key.index(Ellipsis)
        key = key[:i] + (slice(None),) * (3 - len(key) + 1) + key[i + 1 :]
    key = key + (slice(None),) * (3 - len(key))
    if len(key) != 3:
        raise VolumeError(f"volumes are indexed with 3 spatial indices (z, y, x), got {key}")
    start, stop, squeeze = [], [], []
    for k, n in zip(key, shape, strict=True):
        if isinstance(k, slice):
            if k.step not in (None, 1):
                raise VolumeError("volume slices must have step 1")
            a, b, _ = k.indices(n)
            start.append(a)
            stop.append(max(a, b))
            squeeze.append(False)
        else:
            i = int(k) + (n if int(k) < 0 else 0)
            start.append(i)
            stop.append(i + 1)
            squeeze.append(True)
    return Box(start, stop), squeeze


# ---------------------------------------------------------------------- helpers shared by formats
def split_url(url: str) -> tuple[str, str | None]:
    """``path#key`` -> (path, key)."""
    path, _, key = url.partition("#")
    return path, (key or None)


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def is_remote_url(url: str) -> bool:
    return url.startswith(REMOTE_SCHEMES)


def strip_prefix(url: str, prefixes: Sequence[str]) -> str:
    for prefix in prefixes:
        if url.startswith(prefix):
            return url[len(prefix) :]
    return url


def voxel_size_from_attrs(attrs: Any) -> tuple[float, float, float] | None:
    """Voxel size (nm, z, y, x) from the attribute names the field uses."""
    for key in ("resolution_nm_zyx", "voxel_size", "voxel_size_nm_zyx", "resolution"):
        if key in attrs:
            values = [float(v) for v in np.asarray(attrs[key]).ravel()]
            if len(values) == 3:
                return tuple(values)  # type: ignore[return-value]
    if "element_size_um" in attrs:  # ilastik / CREMI convention
        values = [float(v) * 1000 for v in np.asarray(attrs["element_size_um"]).ravel()]
        if len(values) == 3:
            return tuple(values)  # type: ignore[return-value]
    return None


def check_not_empty(shape: Sequence[int], num_channels: int, url: str) -> None:
    if min(shape) <= 0 or num_channels <= 0:
        raise VolumeError(
            f"{url}: the volume is empty (shape z, y, x = {tuple(shape)}, {num_channels} "
            "channel(s)); every dimension must be at least 1"
        )


def require_3d_or_4d(shape: tuple[int, ...], url: str) -> tuple[tuple[int, int, int], int]:
    """Split an array shape into spatial (z, y, x) and a channel count (channels first)."""
    if len(shape) == 3:
        return shape, 1  # type: ignore[return-value]
    if len(shape) == 4:
        return shape[1:], shape[0]  # type: ignore[return-value]
    raise VolumeError(f"{url}: expected a 3D (z, y, x) or 4D (c, z, y, x) array, got {shape}")


# ---------------------------------------------------------------------- the facade
def format_of(url: str) -> str:
    """The registered format name for ``url``, or a VolumeError listing the forms we accept."""
    # Explicit prefixes and file suffixes win over directory sniffing.
    order = ["hdf5", "tiff", "npy", "zarr", "precomputed"]
    for name in order:
        if VOLUME_FORMATS.get(name).matches(url):
            return name
    if not is_remote_url(url) and not os.path.exists(split_url(local_path(url))[0]):
        raise VolumeError(f"no volume at {url}: the path does not exist")
    raise VolumeError(
        f"cannot tell the format of {url}: use precomputed://…, a .zarr path, file.h5#dataset, "
        "a .tif/.tiff stack or a .npy file"
    )


def open_volume(
    url: str | os.PathLike,
    mode: str = "r",
    *,
    voxel_size: Sequence[float] | None = None,
    **options: Any,
) -> Volume:
    """Open the volume at ``url`` (see the module docstring for URL forms).

    ``mode`` is ``"r"`` or ``"r+"``; ``voxel_size`` (nm, z, y, x) overrides what the file says.
    Format-specific options (e.g. ``lru_bytes`` for CloudVolume's decoded-chunk cache) pass
    through.
    """
    url = os.fspath(url)
    check_url_scheme(url)
    if mode not in ("r", "r+"):
        raise VolumeError(f"mode must be 'r' or 'r+', not {mode!r}")
    volume = VOLUME_FORMATS.get(format_of(url)).open(url, mode, **options)
    if voxel_size is not None:
        volume.voxel_size = tuple(float(v) for v in voxel_size)
        volume.voxel_size_defaulted = False
    return volume


def check_destination(url: str | os.PathLike) -> None:
    """Call before reading markers or writing anything at a layer destination: the scheme is
    allowed and a bucket's credentials (or zarr's fsspec backend) are there, so a job fails in
    a second instead of after a storage library's retries."""
    url = os.fspath(url)
    check_url_scheme(url)
    check_remote_access(url, "zarr" if ZarrVolume.matches(url) else "precomputed", create=True)


def create_volume(
    url: str | os.PathLike,
    *,
    shape: Sequence[int],
    dtype: Any,
    chunk_shape: Sequence[int] = (64, 64, 64),
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    layer_type: LayerType | None = None,
    num_channels: int = 1,
    overwrite: bool = False,
    format: str | None = None,
    **options: Any,
) -> Volume:
    """Create an empty, writable volume (precomputed, zarr, HDF5 or npy) at ``url``."""
    url = os.fspath(url)
    check_url_scheme(url)
    if len(shape) != 3 or len(chunk_shape) != 3:
        raise VolumeError(f"{url}: shape and chunk shape must be z, y, x triples")
    check_not_empty(tuple(int(s) for s in shape), int(num_channels), url)
    if min(int(c) for c in chunk_shape) <= 0:
        raise VolumeError(f"{url}: chunk shape {tuple(chunk_shape)} must be positive")
    if format is None:
        format = next(
            (n for n in ("hdf5", "npy", "zarr") if VOLUME_FORMATS.get(n).matches(url)),
            "precomputed",
        )
    chunk_shape = tuple(min(int(c), int(s)) for c, s in zip(chunk_shape, shape, strict=True))
    return VOLUME_FORMATS.get(format).create(
        url,
        shape=tuple(int(s) for s in shape),
        dtype=np.dtype(dtype),
        chunk_shape=chunk_shape,
        voxel_size=tuple(float(v) for v in voxel_size),
        layer_type=layer_type or _default_layer_type(np.dtype(dtype)),
        num_channels=num_channels,
        overwrite=overwrite,
        **options,
    )


# The formats (neuroray/platform/formats/) subclass Volume and register themselves on import.
from neuroray.platform.formats import ZarrVolume  # noqa: E402 - after the base class
