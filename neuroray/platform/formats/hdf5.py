"""A dataset inside an HDF5 file, named after ``#``: ``cube.h5#volumes/raw``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neuroray.errors import VolumeError
from neuroray.platform.box import Box
from neuroray.platform.volume import (
    VOLUME_FORMATS,
    LayerType,
    Volume,
    checked_dtype,
    local_path,
    require_3d_or_4d,
    split_url,
    voxel_size_from_attrs,
)


@VOLUME_FORMATS.register("hdf5")
class HDF5Volume(Volume):
    """A dataset inside an HDF5 file, named after ``#``: ``cube.h5#volumes/raw``."""

    format_name = "hdf5"
    suffixes = (".h5", ".hdf5", ".hdf")

    def __init__(self, url: str, path: str, key: str, mode: str) -> None:
        import h5py

        self._path, self._key, self._mode = path, key, mode
        self._file = h5py.File(path, "r" if mode == "r" else "a")
        try:
            dataset = self._file[key]
            self._dataset = dataset
            shape, channels = require_3d_or_4d(tuple(dataset.shape), url)
            voxel_size = voxel_size_from_attrs(dataset.attrs) or voxel_size_from_attrs(
                self._file.attrs
            )
            chunks = dataset.chunks[-3:] if dataset.chunks else tuple(min(64, s) for s in shape)
            super().__init__(
                url,
                shape=shape,
                dtype=dataset.dtype,
                voxel_size=voxel_size,  # None: unknown
                chunk_shape=chunks,
                num_channels=channels,
                layer_type=dataset.attrs.get("layer_type"),
                writable=mode != "r",
            )
        except BaseException:
            self._file.close()  # a rejected dataset must not keep its file open
            raise

    @classmethod
    def matches(cls, url: str) -> bool:
        return split_url(local_path(url))[0].endswith(cls.suffixes)

    @classmethod
    def open(cls, url: str, mode: str = "r", **options: Any) -> Volume:
        import h5py

        path, key = split_url(local_path(url))
        if not os.path.isfile(path):
            raise VolumeError(f"HDF5 file {path} does not exist")
        try:
            with h5py.File(path, "r") as f:
                datasets: list[str] = []
                f.visititems(
                    lambda name, obj: (
                        datasets.append(name) if isinstance(obj, h5py.Dataset) else None
                    )
                )
        except OSError as err:
            raise VolumeError(f"{path} is not a readable HDF5 file: {err}") from None
        if key is None:
            if len(datasets) != 1:
                raise VolumeError(
                    f"{url}: name the dataset after '#' (one of: {', '.join(datasets)})"
                )
            key = datasets[0]
        elif key.strip("/") not in datasets:
            raise VolumeError(
                f"{url}: no dataset {key!r} in {path} (datasets: {', '.join(datasets)})"
            )
        return cls(f"{path}#{key}", path, key, mode)

    @classmethod
    def create(
        cls,
        url: str,
        *,
        shape: Sequence[int],
        dtype: Any,
        chunk_shape: Sequence[int],
        voxel_size: Sequence[float],
        layer_type: LayerType = "image",
        num_channels: int = 1,
        overwrite: bool = False,
        **options: Any,
    ) -> Volume:
        import h5py

        path, key = split_url(local_path(url))
        if key is None:
            raise VolumeError(f"{url}: name the dataset to create after '#', e.g. {path}#raw")
        dtype = checked_dtype(dtype, url)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "a") as f:
            if key in f:
                if not overwrite:
                    raise VolumeError(f"{url} already exists; pass overwrite=True to replace it")
                del f[key]
            full_shape = tuple(shape) if num_channels == 1 else (num_channels, *shape)
            chunks = tuple(chunk_shape) if num_channels == 1 else (1, *chunk_shape)
            dataset = f.create_dataset(
                key, shape=full_shape, dtype=dtype, chunks=chunks, compression="gzip"
            )
            dataset.attrs["resolution_nm_zyx"] = np.asarray(voxel_size, dtype=float)
            dataset.attrs["layer_type"] = layer_type
        return cls(f"{path}#{key}", path, key, "r+")

    def _index(self, box: Box) -> tuple[slice, ...]:
        return box.slices if self.num_channels == 1 else (slice(None), *box.slices)

    def _read(self, box: Box) -> np.ndarray:
        data = self._dataset[self._index(box)]
        return data[None] if self.num_channels == 1 else data

    def _write(self, box: Box, data: np.ndarray) -> None:
        self._dataset[self._index(box)] = data[0] if self.num_channels == 1 else data
        self._file.flush()
