"""``.npy`` arrays, memory-mapped."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from neuroray.errors import VolumeError
from neuroray.platform.box import Box
from neuroray.platform.volume import (
    VOLUME_FORMATS,
    Volume,
    checked_dtype,
    local_path,
    require_3d_or_4d,
)


@VOLUME_FORMATS.register("npy")
class NpyVolume(Volume):
    """A ``.npy`` file, memory-mapped."""

    format_name = "npy"

    def __init__(
        self, url: str, data: np.ndarray, voxel_size: Sequence[float] | None, writable: bool
    ):
        self._data = data
        shape, channels = require_3d_or_4d(tuple(data.shape), url)
        super().__init__(
            url,
            shape=shape,
            dtype=data.dtype,
            voxel_size=voxel_size,
            chunk_shape=tuple(min(64, s) for s in shape),
            num_channels=channels,
            writable=writable,
        )

    @classmethod
    def matches(cls, url: str) -> bool:
        return local_path(url).endswith(".npy")

    @classmethod
    def open(cls, url: str, mode: str = "r", **options: Any) -> Volume:
        path = local_path(url)
        if not os.path.isfile(path):
            raise VolumeError(f".npy file {path} does not exist")
        try:
            data = np.load(path, mmap_mode="r" if mode == "r" else "r+")
        except ValueError as err:
            raise VolumeError(f"{path} is not a readable .npy file: {err}") from None
        return cls(url, data, options.get("voxel_size"), mode != "r")  # None: unknown

    @classmethod
    def create(
        cls,
        url: str,
        *,
        shape: Sequence[int],
        dtype: Any,
        voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
        num_channels: int = 1,
        overwrite: bool = False,
        **options: Any,
    ) -> Volume:
        path = local_path(url)
        if os.path.exists(path) and not overwrite:
            raise VolumeError(f"{url} already exists; pass overwrite=True to replace it")
        full_shape = tuple(shape) if num_channels == 1 else (num_channels, *shape)
        data = np.lib.format.open_memmap(
            path, mode="w+", dtype=checked_dtype(dtype, url), shape=full_shape
        )
        return cls(url, data, voxel_size, writable=True)

    def _read(self, box: Box) -> np.ndarray:
        data = np.array(self._data[(..., *box.slices)])
        return data[None] if self.num_channels == 1 else data

    def _write(self, box: Box, data: np.ndarray) -> None:
        self._data[(..., *box.slices)] = data[0] if self.num_channels == 1 else data
        self._data.flush()
