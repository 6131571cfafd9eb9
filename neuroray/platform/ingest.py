"""Convert any source volume into a chunked precomputed or zarr v3 layer plus a Parquet manifest.

The manifest has one row per chunk (its box, intensity mean/std, and for label layers the
foreground fraction and the number of ids), so samplers can reject empty crops without reading
voxels. Ingest is resumable: each finished chunk leaves a small marker holding its statistics
(written after the chunk itself), and a rerun skips chunks whose marker exists. A chunk cut off
mid-write has no marker and is written again, so the layer is never left with a torn chunk that
a rerun trusts.
"""

from __future__ import annotations

import io
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from neuroray.errors import VolumeError
from neuroray.paths import local_file
from neuroray.platform.box import Box, chunk_grid
from neuroray.platform.provenance import check_resume, source_identity, write_fingerprint
from neuroray.platform.storage import delete, get, put_atomic, remove_tree
from neuroray.platform.volume import (
    VOLUME_FORMATS,
    LayerType,
    Volume,
    ZarrVolume,
    check_destination,
    create_volume,
    open_volume,
)

MANIFEST_NAME = "manifest.parquet"
MARKER_DIR = ".neuroray/ingest"
OutputFormat = Literal["precomputed", "zarr"]


@dataclass
class IngestResult:
    url: str
    manifest_url: str
    chunks_written: int
    chunks_skipped: int
    seconds: float
    megabytes: float
    nonfinite_voxels: int = 0
    chunks_repaired: int = 0

    def summary(self) -> str:
        rate = self.megabytes / self.seconds if self.seconds > 0 else float("inf")
        repaired = f" ({self.chunks_repaired} failed to decode)" if self.chunks_repaired else ""
        return (
            f"{self.url}: {self.chunks_written} chunks written{repaired}, "
            f"{self.chunks_skipped} already done, "
            f"{self.megabytes:.1f} MB in {self.seconds:.1f} s ({rate:.1f} MB/s); "
            f"manifest {self.manifest_url}"
        )


# ---------------------------------------------------------------------- small storage helpers
def _layer_dir(url: str) -> str:
    """A CloudFiles path for the directory holding a layer (for markers and the manifest)."""
    if format_of_output(url) == "zarr":
        path = ZarrVolume.store_path(url)
    else:
        path = url.removeprefix("precomputed://")
    return path if "://" in path else "file://" + os.path.abspath(path)


__all__ = ["put_atomic"]  # re-exported: markers elsewhere are written the same way


def _checked_voxel_size(voxel_size: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(v) for v in voxel_size)
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise VolumeError(f"voxel size must be 3 positive numbers z, y, x (nm), got {voxel_size}")
    return values  # type: ignore[return-value]


def _nm(voxel_size: Sequence[float]) -> str:
    return " x ".join(f"{v:g}" for v in voxel_size)


def format_of_output(url: str) -> OutputFormat:
    return "zarr" if ZarrVolume.matches(url) else "precomputed"


def manifest_url(layer_url: str) -> str:
    return f"{_layer_dir(layer_url)}/{MANIFEST_NAME}"


def read_manifest(layer_url: str) -> pa.Table:
    """The manifest written by :func:`ingest` next to a layer."""
    content = get(_layer_dir(layer_url), MANIFEST_NAME)
    if content is None:
        raise VolumeError(
            f"{layer_url} has no {MANIFEST_NAME}; create it with `neuroray data ingest`"
        )
    return pq.read_table(io.BytesIO(content))


def manifest_boxes(table: pa.Table) -> list[Box]:
    cols = [table.column(name).to_numpy() for name in ("z0", "y0", "x0", "z1", "y1", "x1")]
    return [Box(row[:3], row[3:]) for row in np.stack(cols, axis=1)]


# ---------------------------------------------------------------------- statistics per chunk
def chunk_stats(data: np.ndarray, layer_type: LayerType) -> dict[str, Any]:
    if layer_type == "segmentation":
        ids = np.unique(data)
        ids = ids[ids != 0]
        return {
            "mean": None,
            "std": None,
            "foreground_fraction": float(np.count_nonzero(data)) / data.size,
            "n_ids": int(ids.size),
        }
    values = data.astype(np.float64, copy=False)
    finite = np.isfinite(values)
    nonfinite = int(finite.size - np.count_nonzero(finite))
    if nonfinite:
        values = values[finite]
    return {
        "mean": float(values.mean()) if values.size else None,
        "std": float(values.std()) if values.size else None,
        "foreground_fraction": None,
        "n_ids": None,
        **({"nonfinite": nonfinite} if nonfinite else {}),
    }


def _manifest_table(rows: list[dict[str, Any]]) -> pa.Table:
    schema = pa.schema(
        [(name, pa.int64()) for name in ("z0", "y0", "x0", "z1", "y1", "x1")]
        + [
            ("mean", pa.float64()),
            ("std", pa.float64()),
            ("foreground_fraction", pa.float64()),
            ("n_ids", pa.int64()),
        ]
    )
    # column by column: Table.from_pylist would import pandas (seconds) for nothing
    columns = {
        field.name: pa.array([row[field.name] for row in rows], field.type) for field in schema
    }
    return pa.table(columns, schema=schema)


def _marker_name(box: Box) -> str:
    return f"{MARKER_DIR}/{'_'.join(str(v) for v in box.to_list())}.json"


# ---------------------------------------------------------------------- the job
def _layer_type_for(source: Volume, labels: bool | None) -> LayerType:
    if labels is None:
        return source.layer_type
    if labels and source.dtype.kind not in "ui":
        raise VolumeError(
            f"{source.url}: labels must have an integer dtype, but this array is "
            f"{source.dtype.name}; ingest it as an image (without --labels) or convert it"
        )
    return "segmentation" if labels else "image"


def _output_dtype(source: Volume, layer_type: LayerType) -> np.dtype:
    """Segmentation layers store ids as uint32/uint64 (compressed_segmentation needs them)."""
    if layer_type != "segmentation":
        return source.dtype
    if source.dtype.kind == "i" and source.dtype.itemsize == 8 or source.dtype.name == "uint64":
        return np.dtype("uint64")
    return np.dtype("uint32")


def _holds_layer(dst: str) -> bool:
    """Whether ``dst`` already holds a layer (its metadata file), as opposed to nothing."""
    try:
        open_volume(dst)
    except VolumeError:
        return False
    return True


def _check_destination(dst: str, overwrite: bool) -> None:
    """Refuse a local destination that holds files but no layer (a typo such as ``.`` or a
    data folder): neither resuming nor ``--overwrite`` may write into it or delete it."""
    path = local_file(dst)
    if path is None or not path.is_dir() or not any(path.iterdir()) or _holds_layer(dst):
        return
    raise VolumeError(
        f"{dst} is a folder with other files in it, not a layer; ingest into a new or empty "
        "folder" + (" (--overwrite only replaces layers)" if overwrite else "")
    )


def _fingerprint(source: Volume, spec: dict[str, Any]) -> dict[str, Any]:
    digest = getattr(source, "content_sha256", None)
    return {
        "kind": "ingest",
        "source": source_identity(source.url, digest() if digest else None),
        **{key: _plain(value) for key, value in spec.items()},
    }


def _plain(value: Any) -> Any:
    if isinstance(value, np.dtype):
        return value.name
    return list(value) if isinstance(value, tuple) else value


def _verify_chunks(destination: Volume, boxes: list[Box], directory: str) -> int:
    """``--repair``: forget the marker of every chunk that no longer decodes; returns how many."""
    broken = 0
    for box in tqdm(boxes, desc="verify chunks", unit="chunk", leave=False):
        if get(directory, _marker_name(box)) is None:
            continue
        try:
            destination.read(box)
        except VolumeError:
            delete(directory, _marker_name(box))
            broken += 1
    return broken


def ingest(
    src: str | Volume,
    dst: str,
    *,
    chunk_shape: tuple[int, int, int] = (64, 64, 64),
    labels: bool | None = None,
    overwrite: bool = False,
    repair: bool = False,
    progress: bool = True,
    on_chunk: Callable[[Box], None] | None = None,
    voxel_size: Sequence[float] | None = None,
) -> IngestResult:
    """Copy ``src`` into a chunked layer at ``dst`` (precomputed, or zarr v3 for ``*.zarr``).

    ``labels`` forces a segmentation (True) or image (False) layer; by default 32/64-bit integer
    sources become segmentation layers. Rerunning after an interruption writes only the chunks
    that were not finished; a rerun with another source or other settings is refused (see
    :mod:`neuroray.platform.provenance`) unless ``overwrite``, which empties ``dst`` first.
    ``repair`` rewrites the chunks of an existing layer that fail to decode.
    ``on_chunk`` is called after each chunk is durably written. ``voxel_size`` (nm, z, y, x)
    replaces the source's; a source that carries none is written as 1 x 1 x 1 nm with a warning.
    """
    source = src if isinstance(src, Volume) else open_volume(src)
    if voxel_size is not None:
        source.voxel_size = _checked_voxel_size(voxel_size)
        source.voxel_size_defaulted = False
    check_destination(dst)  # scheme and credentials, before any marker is read
    if any(VOLUME_FORMATS.get(name).matches(dst) for name in ("hdf5", "tiff", "npy")):
        raise VolumeError(f"{dst}: ingest writes precomputed layers or .zarr arrays only")
    layer_type = _layer_type_for(source, labels)
    dtype = _output_dtype(source, layer_type)
    spec = {
        "shape": source.shape,
        "dtype": dtype,
        "chunk_shape": tuple(
            min(int(c), s) for c, s in zip(chunk_shape, source.shape, strict=True)
        ),
        "voxel_size": source.voxel_size,
        "layer_type": layer_type,
        "num_channels": source.num_channels,
    }
    fingerprint = _fingerprint(source, spec)
    directory = _layer_dir(dst)
    _check_destination(dst, overwrite)
    if overwrite:
        remove_tree(directory)
        resuming = False
    else:
        resuming = check_resume(directory, fingerprint, what=dst, overwrite_hint="pass --overwrite")
        if not resuming and _holds_layer(dst):
            raise VolumeError(
                f"{dst} already holds a layer that this ingest did not write (it has no "
                "fingerprint); pass --overwrite to replace it, or choose another destination"
            )
    if repair and not resuming and not overwrite:
        raise VolumeError(f"--repair needs an existing layer ingested from {source.url} at {dst}")
    if source.voxel_size_defaulted:  # said once every check passed
        warnings.warn(
            f"{source.url} carries no voxel size: writing {_nm(source.voxel_size)} nm "
            "(z, y, x); pass --voxel-size Z,Y,X (nm) to record the real one",
            stacklevel=2,
        )
    if resuming:
        destination = open_volume(dst, "r+")
    else:
        destination = create_volume(dst, format=format_of_output(dst), overwrite=True, **spec)
        write_fingerprint(directory, fingerprint)
    boxes = list(chunk_grid(destination.bounds, destination.chunk_shape))
    repaired = _verify_chunks(destination, boxes, directory) if repair else 0
    try:
        result = _copy_chunks(source, destination, boxes, directory, layer_type, progress, on_chunk)
    except VolumeError:
        if not resuming:  # bad source content found part-way: leave no half-written layer
            remove_tree(directory)
        raise
    result.chunks_repaired = repaired
    return result


def _copy_chunks(
    source: Volume,
    destination: Volume,
    boxes: list[Box],
    directory: str,
    layer_type: LayerType,
    progress: bool,
    on_chunk: Callable[[Box], None] | None,
) -> IngestResult:
    dtype = destination.dtype
    rows: list[dict[str, Any]] = []
    written = skipped = nonfinite = 0
    nbytes = 0
    started = time.perf_counter()
    bar = tqdm(
        boxes, desc=f"ingest {Path(destination.url).name}", unit="chunk", disable=not progress
    )
    for box in bar:
        marker = _read_marker(directory, box)
        if marker is None:
            data = source.read(box)
            if layer_type == "segmentation" and data.dtype.kind == "i" and data.min() < 0:
                raise VolumeError(f"{source.url}: label ids must be non-negative (see {box})")
            destination.write(box, data.astype(dtype, copy=False))
            marker = {"box": box.to_list(), **chunk_stats(data, layer_type)}
            put_atomic(directory, _marker_name(box), json.dumps(marker).encode())
            written += 1
            nbytes += data.nbytes
            if on_chunk is not None:
                on_chunk(box)
        else:
            skipped += 1
        nonfinite += marker.get("nonfinite", 0)
        rows.append(
            {
                **dict(zip(("z0", "y0", "x0", "z1", "y1", "x1"), box.to_list(), strict=True)),
                **{k: marker[k] for k in ("mean", "std", "foreground_fraction", "n_ids")},
            }
        )
    sink = io.BytesIO()
    pq.write_table(_manifest_table(rows), sink)
    put_atomic(directory, MANIFEST_NAME, sink.getvalue())
    if nonfinite:
        warnings.warn(
            f"{source.url}: {nonfinite} voxels are NaN or infinite; they were copied as they are "
            "and left out of the manifest's mean and std",
            stacklevel=3,
        )
    return IngestResult(
        url=destination.url,
        manifest_url=f"{directory}/{MANIFEST_NAME}",
        chunks_written=written,
        chunks_skipped=skipped,
        seconds=time.perf_counter() - started,
        megabytes=nbytes / 1e6,
        nonfinite_voxels=nonfinite,
    )


def _read_marker(directory: str, box: Box) -> dict[str, Any] | None:
    content = get(directory, _marker_name(box))
    if content is None:
        return None
    try:
        marker = json.loads(content)
    except ValueError:  # a torn marker: redo the chunk
        return None
    return marker if marker.get("box") == box.to_list() else None
