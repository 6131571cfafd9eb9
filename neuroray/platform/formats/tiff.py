"""Multi-page TIFF stacks (z, y, x) with their voxel size from the description or tags."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any

import numpy as np

from neuroray.errors import VolumeError
from neuroray.platform.box import Box
from neuroray.platform.volume import (
    VOLUME_FORMATS,
    Volume,
    local_path,
    require_3d_or_4d,
)


@VOLUME_FORMATS.register("tiff")
class TiffVolume(Volume):
    """A multi-page TIFF stack (z, y, x), memory-mapped when uncompressed, else loaded once."""

    format_name = "tiff"

    def __init__(
        self, url: str, data: np.ndarray, voxel_size: tuple[float, float, float] | None
    ) -> None:
        self._data = data
        shape, channels = require_3d_or_4d(tuple(data.shape), url)
        super().__init__(
            url,
            shape=shape,
            dtype=data.dtype,
            voxel_size=voxel_size,
            chunk_shape=(1, *shape[1:]),
            num_channels=channels,
        )

    @classmethod
    def matches(cls, url: str) -> bool:
        return local_path(url).lower().endswith((".tif", ".tiff"))

    @classmethod
    def open(cls, url: str, mode: str = "r", **options: Any) -> Volume:
        import tifffile

        path = local_path(url)
        if not os.path.isfile(path):
            raise VolumeError(f"TIFF file {path} does not exist")
        try:
            with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
                if not tif.pages:
                    raise VolumeError(f"{path} is not a readable TIFF: it holds no pages")
                voxel_size = _tiff_voxel_size(tif)
                try:
                    data = tifffile.memmap(path, mode="r")
                except ValueError:  # compressed or non-contiguous: decode once
                    data = tif.asarray()
        except VolumeError:
            raise
        except Exception as err:  # tifffile raises many kinds on a malformed file
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise VolumeError(f"{path} is not a readable TIFF: {message}") from None
        if data.ndim == 2:
            data = data[None]
        return cls(url, data, voxel_size)

    def _read(self, box: Box) -> np.ndarray:
        data = np.asarray(self._data[(..., *box.slices)])
        return data[None] if self.num_channels == 1 else data


@contextlib.contextmanager
def _quiet_tifffile():
    """tifffile logs warnings about a malformed file before raising; the error says it all."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _tiff_voxel_size(tif: Any) -> tuple[float, float, float] | None:
    """Voxel size from tifffile's JSON description, ImageJ metadata or resolution tags (nm);
    None when the file says nothing."""
    page = tif.pages[0]
    description = page.tags.get("ImageDescription")
    if description is not None:
        try:
            meta = json.loads(description.value)
            if "spacing_um_zyx" in meta:
                return tuple(float(v) * 1000 for v in meta["spacing_um_zyx"])  # type: ignore[return-value]
            if "voxel_size_nm_zyx" in meta:
                return tuple(float(v) for v in meta["voxel_size_nm_zyx"])  # type: ignore[return-value]
        except (ValueError, TypeError):
            pass
    ij = tif.imagej_metadata or {}
    unit_nm = {"micron": 1000.0, "um": 1000.0, "\\u00B5m": 1000.0, "nm": 1.0}.get(
        str(ij.get("unit", "")), None
    )
    xres, yres = page.tags.get("XResolution"), page.tags.get("YResolution")
    if not (unit_nm and xres and yres):
        return None
    x = unit_nm * xres.value[1] / xres.value[0]
    y = unit_nm * yres.value[1] / yres.value[0]
    z = unit_nm * float(ij.get("spacing", 1.0))
    return (z, y, x)
