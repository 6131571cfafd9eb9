"""Neuroglancer precomputed layers through CloudVolume (local, gs://, s3://, https://)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from neuroray.errors import VolumeError
from neuroray.platform.box import Box
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
    strip_prefix,
)


@VOLUME_FORMATS.register("precomputed")
class PrecomputedVolume(Volume):
    """Neuroglancer precomputed layers through CloudVolume (local, gs://, s3://, https://)."""

    format_name = "precomputed"

    def __init__(self, url: str, cv: Any, writable: bool) -> None:
        self._cv = cv
        self._offset = tuple(int(v) for v in cv.voxel_offset[::-1])
        super().__init__(
            url,
            shape=tuple(int(v) for v in cv.volume_size[::-1]),
            dtype=cv.dtype,
            voxel_size=tuple(float(v) for v in cv.resolution[::-1]),
            chunk_shape=tuple(int(v) for v in cv.chunk_size[::-1]),
            num_channels=int(cv.num_channels),
            layer_type=cv.layer_type if cv.layer_type in ("image", "segmentation") else None,
            writable=writable,
        )

    @staticmethod
    def cloudpath(url: str) -> str:
        path = strip_prefix(url, ("precomputed://",))
        if "://" not in path:
            path = "file://" + os.path.abspath(path)
        return path

    @classmethod
    def matches(cls, url: str) -> bool:
        if url.startswith("precomputed://"):
            return True
        path = local_path(url)
        if is_remote_url(url):
            return ".zarr" not in url and not url.endswith((".h5", ".tif", ".tiff", ".npy"))
        return os.path.isfile(os.path.join(path, "info"))

    @classmethod
    def open(cls, url: str, mode: str = "r", lru_bytes: int = 0, **options: Any) -> Volume:
        from cloudvolume import CloudVolume
        from cloudvolume.exceptions import InfoUnavailableError

        cloudpath = cls.cloudpath(url)
        check_remote_access(url, "precomputed")
        if cloudpath.startswith("file://"):
            _check_local_info(url, os.path.join(cloudpath.removeprefix("file://"), "info"))
        try:
            cv = CloudVolume(
                cloudpath,
                mip=0,
                bounded=True,
                fill_missing=False,
                progress=False,
                cache=False,
                lru_bytes=lru_bytes,
                non_aligned_writes=options.get("non_aligned_writes", False),
            )
        except InfoUnavailableError:
            raise VolumeError(
                f"no precomputed layer at {url} (its 'info' file is missing); "
                "check the path or ingest a source there with `neuroray data ingest`"
            ) from None
        except VolumeError:
            raise
        except Exception as err:
            if is_remote_url(cloudpath):
                raise remote_error(url, err, "precomputed") from None
            raise VolumeError(
                f"{url}: its precomputed 'info' is not usable ({type(err).__name__}: {err})"
            ) from None
        return cls(url, cv, writable=mode != "r")

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
        compress: str | None = "gzip",
        **options: Any,
    ) -> Volume:
        from cloudvolume import CloudVolume

        dtype = checked_dtype(dtype, url)
        cloudpath = cls.cloudpath(url)
        check_remote_access(url, "precomputed", create=True)
        try:
            exists = not overwrite and cls._info_exists(cloudpath)
        except Exception as err:
            if is_remote_url(cloudpath):
                raise remote_error(url, err, "precomputed") from None
            raise
        if exists:
            raise VolumeError(f"{url} already holds a layer; pass overwrite=True to replace it")
        encoding = "compressed_segmentation" if layer_type == "segmentation" else "raw"
        if encoding == "compressed_segmentation" and dtype.name not in ("uint32", "uint64"):
            encoding = "raw"
        info = CloudVolume.create_new_info(
            num_channels=num_channels,
            layer_type=layer_type,
            data_type=dtype.name,
            encoding=encoding,
            resolution=[int(v) if float(v).is_integer() else float(v) for v in voxel_size][::-1],
            voxel_offset=[0, 0, 0],
            volume_size=list(shape)[::-1],
            chunk_size=list(chunk_shape)[::-1],
        )
        try:
            cv = CloudVolume(cloudpath, info=info, compress=compress, progress=False, **options)
            cv.commit_info()
            cv.commit_provenance()
        except Exception as err:
            if is_remote_url(cloudpath):
                raise remote_error(url, err, "precomputed") from None
            raise
        return cls(url, cv, writable=True)

    @staticmethod
    def _info_exists(cloudpath: str) -> bool:
        from cloudfiles import CloudFiles

        return CloudFiles(cloudpath).exists("info")

    def _cv_slices(self, box: Box) -> tuple[slice, slice, slice]:
        start = [a + o for a, o in zip(box.start, self._offset, strict=True)]
        stop = [b + o for b, o in zip(box.stop, self._offset, strict=True)]
        return slice(start[2], stop[2]), slice(start[1], stop[1]), slice(start[0], stop[0])

    def _read(self, box: Box) -> np.ndarray:
        cutout = np.asarray(self._cv[self._cv_slices(box)])  # x, y, z, c
        return np.ascontiguousarray(cutout.transpose(3, 2, 1, 0))

    def _write(self, box: Box, data: np.ndarray) -> None:
        self._cv[self._cv_slices(box)] = np.asarray(data).transpose(3, 2, 1, 0)


def _check_local_info(url: str, path: str) -> None:
    """A local precomputed ``info`` must be a JSON object with at least one scale."""
    if not os.path.isfile(path):
        return  # CloudVolume reports the missing file
    try:
        with open(path, "rb") as f:
            info = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise VolumeError(
            f"{url}: its 'info' file is not valid JSON ({type(err).__name__}: {err}); "
            "the layer is corrupt: re-ingest it"
        ) from None
    if not isinstance(info, dict):
        raise VolumeError(f"{url}: its 'info' file holds {type(info).__name__}, not a JSON object")
    scales = info.get("scales")
    if not isinstance(scales, list) or not scales:
        raise VolumeError(f"{url}: its 'info' file lists no scales; the layer is corrupt")
    for key in ("size", "resolution", "chunk_sizes"):
        if key not in scales[0]:
            raise VolumeError(f"{url}: scale 0 of its 'info' file has no {key!r}")
