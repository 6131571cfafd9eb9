"""One facade over every volume format: ``open_volume(url)`` and ``create_volume(url, ...)``.

Formats are plugins in :data:`VOLUME_FORMATS` (CloudVolume style): Neuroglancer precomputed
(through CloudVolume), zarr v2/v3, HDF5 (``file.h5#dataset``), multi-page TIFF and ``.npy``.
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

import contextlib
import importlib.util
import json
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from neuroray.errors import VolumeError
from neuroray.platform.box import Box
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
REMOTE_SCHEMES = ("gs://", "s3://", "http://", "https://")
#: Format prefixes a URL may start with, before an optional storage scheme.
FORMAT_SCHEMES = ("precomputed", "zarr", "zarr2", "zarr3")
#: Where volumes may live: a local path (or file://), a bucket or a web server.
STORAGE_SCHEMES = ("file", "gs", "s3", "http", "https")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
#: fsspec backends zarr needs per scheme, and the neuroray extra that installs each.
FSSPEC_BACKENDS = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs")}


def _checked_dtype(dtype: Any, url: str) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.name not in SUPPORTED_DTYPES:
        raise VolumeError(
            f"{url}: dtype {dtype.name} is not supported (use one of {', '.join(SUPPORTED_DTYPES)})"
        )
    return dtype


def _default_layer_type(dtype: np.dtype) -> LayerType:
    return "segmentation" if dtype.kind in "ui" and dtype.itemsize >= 4 else "image"


class Volume(ABC):
    """A 3D (optionally multi-channel) array on disk or in a bucket, read and written in z, y, x."""

    format_name: str = ""

    def __init__(
        self,
        url: str,
        *,
        shape: Sequence[int],
        dtype: Any,
        voxel_size: Sequence[float],
        chunk_shape: Sequence[int],
        num_channels: int = 1,
        layer_type: LayerType | None = None,
        writable: bool = False,
    ) -> None:
        self.url = url
        self.shape = tuple(int(s) for s in shape)
        self.dtype = _checked_dtype(dtype, url)
        self.voxel_size = tuple(float(v) for v in voxel_size)
        self.chunk_shape = tuple(int(c) for c in chunk_shape)
        self.num_channels = int(num_channels)
        self.layer_type: LayerType = layer_type or _default_layer_type(self.dtype)
        self.writable = writable
        if len(self.shape) != 3 or len(self.voxel_size) != 3 or len(self.chunk_shape) != 3:
            raise VolumeError(
                f"{url}: expected a 3D volume (z, y, x), got shape {self.shape}, "
                f"voxel size {self.voxel_size}, chunks {self.chunk_shape}"
            )
        _check_not_empty(self.shape, self.num_channels, url)

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


def _is_remote(url: str) -> bool:
    return url.startswith(REMOTE_SCHEMES)


def _strip_prefix(url: str, prefixes: Sequence[str]) -> str:
    for prefix in prefixes:
        if url.startswith(prefix):
            return url[len(prefix) :]
    return url


def _voxel_size_from_attrs(attrs: Any) -> tuple[float, float, float] | None:
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


def _check_not_empty(shape: Sequence[int], num_channels: int, url: str) -> None:
    if min(shape) <= 0 or num_channels <= 0:
        raise VolumeError(
            f"{url}: the volume is empty (shape z, y, x = {tuple(shape)}, {num_channels} "
            "channel(s)); every dimension must be at least 1"
        )


# ---------------------------------------------------------------------- URL schemes, remote access
def url_scheme(url: str) -> str | None:
    """The storage scheme of ``url`` after any format prefix (``s3`` for ``zarr://s3://b/x``),
    ``None`` for a local path."""
    match = _SCHEME.match(url)
    if match and match.group(1) in FORMAT_SCHEMES:
        match = _SCHEME.match(url[match.end() :])
    return match.group(1) if match else None


def check_url_scheme(url: str) -> None:
    """Refuse URL schemes neuroray has no backend for (instead of writing ``./ftp:/host/x``)."""
    allowed = ", ".join(f"{s}://" for s in (*FORMAT_SCHEMES[:2], *STORAGE_SCHEMES))
    match = _SCHEME.match(url)
    rest = url
    if match and match.group(1) in FORMAT_SCHEMES:
        rest = url[match.end() :]
        match = _SCHEME.match(rest)
    if match and match.group(1) not in STORAGE_SCHEMES:
        raise VolumeError(
            f"{url}: unsupported URL scheme {match.group(1)}://; use a local path or one of "
            f"{allowed} (e.g. precomputed://gs://bucket/layer, zarr://s3://bucket/x.zarr)"
        )


def _bucket_of(url: str) -> str:
    rest = url
    for _ in range(2):
        match = _SCHEME.match(rest)
        if match:
            rest = rest[match.end() :]
    return rest.split("/", 1)[0]


def _aws_help(url: str, zarr: bool) -> str:
    where = (
        "~/.aws/credentials or AWS_PROFILE"
        if zarr
        else "~/.cloudvolume/secrets/aws-secret.json (keys AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY) or ~/.aws/credentials"
    )
    return (
        f"{url}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
        f"(and AWS_SESSION_TOKEN) in the environment, or write {where}"
    )


def _google_help(url: str) -> str:
    return (
        f"{url}: no Google Cloud credentials found; set GOOGLE_APPLICATION_CREDENTIALS to a "
        "service-account JSON key, write ~/.cloudvolume/secrets/google-secret.json, or run "
        "`gcloud auth application-default login`; a public bucket is also readable as "
        "https://storage.googleapis.com/<bucket>/<path>"
    )


def _aws_credentials_found(bucket: str) -> bool:
    """Whether CloudVolume (its secrets files, then boto3's chain) will find AWS credentials."""
    from cloudfiles.secrets import aws_credentials

    try:
        if aws_credentials(bucket, "s3").get("AWS_ACCESS_KEY_ID"):
            return True
    except KeyError as err:  # cloudfiles reads all three variables once the first two are set
        raise VolumeError(
            f"s3://{bucket}: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are set but {err} is "
            "not; CloudVolume reads all three (or write ~/.cloudvolume/secrets/aws-secret.json)"
        ) from None
    import botocore.session

    try:
        return botocore.session.Session().get_credentials() is not None
    except Exception:  # noqa: BLE001 - a broken profile is as good as none
        return False


def _google_credentials_found(bucket: str) -> bool:
    """Whether CloudVolume (its secrets files, then google-auth's defaults) will find any,
    decided from files and the environment only: no metadata-server round trip."""
    from cloudfiles.secrets import secretpath

    if any(
        os.path.exists(secretpath(name))
        for name in (f"{bucket}-google-secret.json", "google-secret.json")
    ):
        return True
    if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS") or os.environ.get("GCE_METADATA_HOST"):
        return True
    gcloud = os.environ.get("CLOUDSDK_CONFIG") or os.path.expanduser("~/.config/gcloud")
    if os.path.isfile(os.path.join(gcloud, "application_default_credentials.json")):
        return True
    if os.environ.get("NO_GCE_CHECK") == "true":  # google-auth then skips the metadata server
        return False
    try:  # on a Google Cloud VM the metadata server supplies credentials
        with open("/sys/class/dmi/id/product_name") as f:
            return f.read().startswith("Google")
    except OSError:
        return False


def _probe_http(url: str) -> None:
    """One request (no retries) so an unreachable host fails in seconds, not after a minute."""
    import requests

    try:
        response = requests.get(url, timeout=(5, 30), stream=True)
        response.close()
    except requests.RequestException as err:
        raise VolumeError(
            f"cannot reach {url}: {type(err).__name__}; check the URL, the network and any "
            "proxy settings (HTTPS_PROXY / HTTP_PROXY)"
        ) from None
    if response.status_code == 404:
        raise VolumeError(f"no volume at {url}: the server answers 404 Not Found")
    if response.status_code in (401, 403):
        raise VolumeError(
            f"{url}: the server refuses access ({response.status_code}); this layer is not public"
        )
    if response.status_code >= 400:
        raise VolumeError(f"{url}: the server answers HTTP {response.status_code}")


def check_remote_access(url: str, format_name: str, *, create: bool = False) -> None:
    """Fail fast, before any library's retry loop, when a remote volume cannot be reached:
    missing credentials, a missing fsspec backend, an unreachable web server."""
    scheme = url_scheme(url)
    if scheme in (None, "file"):
        return
    if create and scheme in ("http", "https"):
        raise VolumeError(
            f"{url}: http(s) volumes are read-only; write to a local path, gs:// or s3://"
        )
    if format_name == "zarr":
        if scheme in FSSPEC_BACKENDS:
            package, extra = FSSPEC_BACKENDS[scheme]
            if importlib.util.find_spec(package) is None:
                raise VolumeError(
                    f"{url}: zarr on {scheme}:// needs the fsspec backend {package}; install it "
                    f"with `pip install 'neuroray[{extra}]'`"
                )
        return
    bucket = _bucket_of(url)
    if scheme == "s3" and not _aws_credentials_found(bucket):
        raise VolumeError(_aws_help(url, zarr=False))
    if scheme == "gs" and not _google_credentials_found(bucket):
        raise VolumeError(_google_help(url))
    if scheme in ("http", "https") and not create:
        _probe_http(PrecomputedVolume.cloudpath(url).rstrip("/") + "/info")


def remote_error(url: str, err: Exception, format_name: str) -> VolumeError:
    """A storage library's exception on a remote URL, as one line that says what to configure."""
    name = type(err).__name__
    text = str(err).splitlines()[0] if str(err) else name
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return VolumeError(_aws_help(url, zarr=format_name == "zarr"))
    if name in ("DefaultCredentialsError", "RefreshError"):
        return VolumeError(_google_help(url))
    if name in ("ConnectionError", "Timeout", "ConnectTimeout", "ReadTimeout"):
        return VolumeError(
            f"cannot reach {url}: {text}; check the URL, the network and any proxy settings"
        )
    if isinstance(err, ImportError) or "install" in text.lower():
        scheme = url_scheme(url)
        package, extra = FSSPEC_BACKENDS.get(scheme or "", (None, None))
        if package:
            return VolumeError(
                f"{url}: {format_name} on {scheme}:// needs {package}; install it with "
                f"`pip install 'neuroray[{extra}]'`"
            )
    if name in ("Forbidden", "AccessDenied", "Unauthorized") or "403" in text:
        return VolumeError(f"{url}: access denied ({text}); check the credentials' permissions")
    return VolumeError(f"cannot open {url}: {name}: {text}")


def _require_3d_or_4d(shape: tuple[int, ...], url: str) -> tuple[tuple[int, int, int], int]:
    """Split an array shape into spatial (z, y, x) and a channel count (channels first)."""
    if len(shape) == 3:
        return shape, 1  # type: ignore[return-value]
    if len(shape) == 4:
        return shape[1:], shape[0]  # type: ignore[return-value]
    raise VolumeError(f"{url}: expected a 3D (z, y, x) or 4D (c, z, y, x) array, got {shape}")


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


# ---------------------------------------------------------------------- precomputed (CloudVolume)
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
        path = _strip_prefix(url, ("precomputed://",))
        if "://" not in path:
            path = "file://" + os.path.abspath(path)
        return path

    @classmethod
    def matches(cls, url: str) -> bool:
        if url.startswith("precomputed://"):
            return True
        path = local_path(url)
        if _is_remote(url):
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
            if _is_remote(cloudpath):
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

        dtype = _checked_dtype(dtype, url)
        cloudpath = cls.cloudpath(url)
        check_remote_access(url, "precomputed", create=True)
        try:
            exists = not overwrite and cls._info_exists(cloudpath)
        except Exception as err:
            if _is_remote(cloudpath):
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
            if _is_remote(cloudpath):
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


# ---------------------------------------------------------------------- zarr v2 / v3
@VOLUME_FORMATS.register("zarr")
class ZarrVolume(Volume):
    """zarr v2 and v3 arrays, local or on any fsspec URL (s3://, gs://, https://)."""

    format_name = "zarr"

    def __init__(self, url: str, array: Any, writable: bool) -> None:
        self._array = array
        attrs = dict(array.attrs)
        shape, channels = _require_3d_or_4d(tuple(array.shape), url)
        chunks = tuple(array.chunks)[-3:]
        super().__init__(
            url,
            shape=shape,
            dtype=array.dtype,
            voxel_size=_voxel_size_from_attrs(attrs) or (1.0, 1.0, 1.0),
            chunk_shape=chunks,
            num_channels=channels,
            layer_type=attrs.get("layer_type"),
            writable=writable,
        )

    @staticmethod
    def store_path(url: str) -> str:
        path = _strip_prefix(url, ("zarr://", "zarr2://", "zarr3://"))
        return local_path(path) if path.startswith("file://") else path

    @classmethod
    def matches(cls, url: str) -> bool:
        if url.startswith(("zarr://", "zarr2://", "zarr3://")):
            return True
        path = local_path(url).rstrip("/")
        if path.endswith(".zarr") or ".zarr/" in path:
            return True
        return not _is_remote(url) and (
            os.path.isfile(os.path.join(path, "zarr.json"))
            or os.path.isfile(os.path.join(path, ".zarray"))
        )

    @classmethod
    def open(cls, url: str, mode: str = "r", **options: Any) -> Volume:
        import zarr

        path = cls.store_path(url)
        if not _is_remote(path) and not os.path.exists(path):
            raise VolumeError(f"no zarr array at {url}: {path} does not exist")
        check_remote_access(url, "zarr")
        try:
            array = zarr.open_array(
                store=path, mode="r" if mode == "r" else "r+", **_storage_options(options)
            )
        except Exception as err:
            if _is_remote(path):
                raise remote_error(url, err, "zarr") from None
            raise VolumeError(f"cannot open zarr array at {url}: {err}") from None
        return cls(url, array, writable=mode != "r")

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

        dtype = _checked_dtype(dtype, url)
        full_shape = tuple(shape) if num_channels == 1 else (num_channels, *shape)
        chunks = tuple(chunk_shape) if num_channels == 1 else (num_channels, *chunk_shape)
        path = cls.store_path(url)
        if not overwrite and not _is_remote(path) and os.path.exists(path):
            raise VolumeError(f"{url} already exists; pass overwrite=True to replace it")
        check_remote_access(url, "zarr", create=True)
        attributes = {
            "voxel_size": [float(v) for v in voxel_size],
            "axis_order": "czyx" if num_channels > 1 else "zyx",
            "layer_type": layer_type,
        }
        try:
            array = zarr.create_array(
                store=path,
                shape=full_shape,
                chunks=chunks,
                dtype=dtype,
                compressors=ZstdCodec(level=3) if zarr_format == 3 else "auto",
                fill_value=0,
                zarr_format=zarr_format,
                attributes=attributes,
                overwrite=overwrite,
                **_storage_options(options),
            )
        except Exception as err:
            if _is_remote(path):
                raise remote_error(url, err, "zarr") from None
            raise
        return cls(url, array, writable=True)

    def _index(self, box: Box) -> tuple[slice, ...]:
        return box.slices if self.num_channels == 1 else (slice(None), *box.slices)

    def _read(self, box: Box) -> np.ndarray:
        data = np.asarray(self._array[self._index(box)])
        return data[None] if self.num_channels == 1 else data

    def _write(self, box: Box, data: np.ndarray) -> None:
        self._array[self._index(box)] = data[0] if self.num_channels == 1 else data


def _storage_options(options: dict[str, Any]) -> dict[str, Any]:
    return {"storage_options": options["storage_options"]} if "storage_options" in options else {}


# ---------------------------------------------------------------------- HDF5
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
            shape, channels = _require_3d_or_4d(tuple(dataset.shape), url)
            voxel_size = _voxel_size_from_attrs(dataset.attrs) or _voxel_size_from_attrs(
                self._file.attrs
            )
            chunks = dataset.chunks[-3:] if dataset.chunks else tuple(min(64, s) for s in shape)
            super().__init__(
                url,
                shape=shape,
                dtype=dataset.dtype,
                voxel_size=voxel_size or (1.0, 1.0, 1.0),
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
        dtype = _checked_dtype(dtype, url)
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


# ---------------------------------------------------------------------- TIFF
@VOLUME_FORMATS.register("tiff")
class TiffVolume(Volume):
    """A multi-page TIFF stack (z, y, x), memory-mapped when uncompressed, else loaded once."""

    format_name = "tiff"

    def __init__(self, url: str, data: np.ndarray, voxel_size: tuple[float, float, float]) -> None:
        self._data = data
        shape, channels = _require_3d_or_4d(tuple(data.shape), url)
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


def _tiff_voxel_size(tif: Any) -> tuple[float, float, float]:
    """Voxel size from tifffile's JSON description, ImageJ metadata or resolution tags (nm)."""
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
    z = y = x = 1.0
    ij = tif.imagej_metadata or {}
    unit_nm = {"micron": 1000.0, "um": 1000.0, "\\u00B5m": 1000.0, "nm": 1.0}.get(
        str(ij.get("unit", "")), None
    )
    xres, yres = page.tags.get("XResolution"), page.tags.get("YResolution")
    if unit_nm and xres and yres:
        x = unit_nm * xres.value[1] / xres.value[0]
        y = unit_nm * yres.value[1] / yres.value[0]
        z = unit_nm * float(ij.get("spacing", 1.0))
    return (z, y, x)


# ---------------------------------------------------------------------- numpy .npy
@VOLUME_FORMATS.register("npy")
class NpyVolume(Volume):
    """A ``.npy`` file, memory-mapped."""

    format_name = "npy"

    def __init__(self, url: str, data: np.ndarray, voxel_size: Sequence[float], writable: bool):
        self._data = data
        shape, channels = _require_3d_or_4d(tuple(data.shape), url)
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
        return cls(url, data, options.get("voxel_size") or (1.0, 1.0, 1.0), mode != "r")

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
            path, mode="w+", dtype=_checked_dtype(dtype, url), shape=full_shape
        )
        return cls(url, data, voxel_size, writable=True)

    def _read(self, box: Box) -> np.ndarray:
        data = np.array(self._data[(..., *box.slices)])
        return data[None] if self.num_channels == 1 else data

    def _write(self, box: Box, data: np.ndarray) -> None:
        self._data[(..., *box.slices)] = data[0] if self.num_channels == 1 else data
        self._data.flush()


# ---------------------------------------------------------------------- the facade
def format_of(url: str) -> str:
    """The registered format name for ``url``, or a VolumeError listing the forms we accept."""
    # Explicit prefixes and file suffixes win over directory sniffing.
    order = ["hdf5", "tiff", "npy", "zarr", "precomputed"]
    for name in order:
        if VOLUME_FORMATS.get(name).matches(url):
            return name
    if not _is_remote(url) and not os.path.exists(split_url(local_path(url))[0]):
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
    _check_not_empty(tuple(int(s) for s in shape), int(num_channels), url)
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
