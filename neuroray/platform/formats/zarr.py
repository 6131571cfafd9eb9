"""zarr v2 / v3 arrays, local or any fsspec URL, with their voxel size from the attributes.

neuroray writes OME-Zarr images (:mod:`neuroray.platform.ngff`: a group with ``multiscales``
metadata and the array at ``0``), so other viewers see the voxel size; it reads those, any
OME-Zarr image with z, y, x axes, and plain arrays with a ``voxel_size``-style attribute (the
layers older neuroray versions wrote).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from neuroray.errors import VolumeError
from neuroray.platform.box import Box
from neuroray.platform.ngff import FULL_RESOLUTION_PATH, multiscales_attributes, read_multiscales
from neuroray.platform.remote import (
    check_remote_access,
    remote_error,
)
from neuroray.platform.volume import (
    VOLUME_FORMATS,
    LayerType,
    Volume,
    checked_dtype,
    is_remote_url,
    local_path,
    require_3d_or_4d,
    strip_prefix,
    voxel_size_from_attrs,
)


@VOLUME_FORMATS.register("zarr")
class ZarrVolume(Volume):
    """zarr v2 and v3 arrays, local or on any fsspec URL (s3://, gs://, https://)."""

    format_name = "zarr"

    def __init__(
        self,
        url: str,
        array: Any,
        writable: bool,
        voxel_size: Sequence[float] | None = None,
    ) -> None:
        self._array = array
        attrs = dict(array.attrs)
        shape, channels = require_3d_or_4d(tuple(array.shape), url)
        chunks = tuple(array.chunks)[-3:]
        super().__init__(
            url,
            shape=shape,
            dtype=array.dtype,
            voxel_size=voxel_size or voxel_size_from_attrs(attrs),  # None: unknown
            chunk_shape=chunks,
            num_channels=channels,
            layer_type=attrs.get("layer_type"),
            writable=writable,
        )

    @staticmethod
    def store_path(url: str) -> str:
        path = strip_prefix(url, ("zarr://", "zarr2://", "zarr3://"))
        return local_path(path) if path.startswith("file://") else path

    @classmethod
    def matches(cls, url: str) -> bool:
        if url.startswith(("zarr://", "zarr2://", "zarr3://")):
            return True
        path = local_path(url).rstrip("/")
        if path.endswith(".zarr") or ".zarr/" in path:
            return True
        return not is_remote_url(url) and (
            os.path.isfile(os.path.join(path, "zarr.json"))
            or os.path.isfile(os.path.join(path, ".zarray"))
            or os.path.isfile(os.path.join(path, ".zgroup"))
        )

    @classmethod
    def open(cls, url: str, mode: str = "r", **options: Any) -> Volume:
        import zarr

        path = cls.store_path(url)
        if not is_remote_url(path) and not os.path.exists(path):
            raise VolumeError(f"no zarr array at {url}: {path} does not exist")
        check_remote_access(url, "zarr")
        try:
            node = zarr.open(
                store=path, mode="r" if mode == "r" else "r+", **_storage_options(options)
            )
        except Exception as err:
            if is_remote_url(path):
                raise remote_error(url, err, "zarr") from None
            raise VolumeError(f"cannot open zarr array at {url}: {err}") from None
        if isinstance(node, zarr.Array):
            return cls(url, node, writable=mode != "r")
        array_path, voxel_size = read_multiscales(dict(node.attrs), url)  # an OME-Zarr image
        try:
            array = node[array_path]
        except KeyError:
            raise VolumeError(
                f"{url}: its OME-Zarr metadata names the array {array_path!r}, which is missing"
            ) from None
        return cls(url, array, writable=mode != "r", voxel_size=voxel_size)

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
        zarr_format: int = 3,
        **options: Any,
    ) -> Volume:
        import zarr
        from zarr.codecs import ZstdCodec

        dtype = checked_dtype(dtype, url)
        full_shape = tuple(shape) if num_channels == 1 else (num_channels, *shape)
        chunks = tuple(chunk_shape) if num_channels == 1 else (num_channels, *chunk_shape)
        path = cls.store_path(url)
        if not overwrite and not is_remote_url(path) and os.path.exists(path):
            raise VolumeError(f"{url} already exists; pass overwrite=True to replace it")
        check_remote_access(url, "zarr", create=True)
        name = os.path.basename(path.rstrip("/")).removesuffix(".zarr")
        axis_names = ["c", "z", "y", "x"] if num_channels > 1 else ["z", "y", "x"]
        try:
            group = zarr.create_group(
                store=path,
                zarr_format=zarr_format,
                attributes=multiscales_attributes(
                    voxel_size, num_channels=num_channels, zarr_format=zarr_format, name=name
                ),
                overwrite=overwrite,
                **_storage_options(options),
            )
            array = group.create_array(
                FULL_RESOLUTION_PATH,
                shape=full_shape,
                chunks=chunks,
                dtype=dtype,
                compressors=ZstdCodec(level=3) if zarr_format == 3 else "auto",
                fill_value=0,
                attributes={"layer_type": layer_type},
                dimension_names=axis_names if zarr_format == 3 else None,
                overwrite=overwrite,
            )
        except Exception as err:
            if is_remote_url(path):
                raise remote_error(url, err, "zarr") from None
            raise
        return cls(url, array, writable=True, voxel_size=voxel_size)

    def _index(self, box: Box) -> tuple[slice, ...]:
        return box.slices if self.num_channels == 1 else (slice(None), *box.slices)

    def _read(self, box: Box) -> np.ndarray:
        data = np.asarray(self._array[self._index(box)])
        return data[None] if self.num_channels == 1 else data

    def _write(self, box: Box, data: np.ndarray) -> None:
        self._array[self._index(box)] = data[0] if self.num_channels == 1 else data


def _storage_options(options: dict[str, Any]) -> dict[str, Any]:
    return {"storage_options": options["storage_options"]} if "storage_options" in options else {}
