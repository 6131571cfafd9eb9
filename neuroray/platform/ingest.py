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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from neuroray.errors import VolumeError
from neuroray.platform.box import Box, chunk_grid
from neuroray.platform.volume import (
    VOLUME_FORMATS,
    LayerType,
    Volume,
    ZarrVolume,
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

    def summary(self) -> str:
        rate = self.megabytes / self.seconds if self.seconds > 0 else float("inf")
        return (
            f"{self.url}: {self.chunks_written} chunks written, {self.chunks_skipped} already done, "
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


def format_of_output(url: str) -> OutputFormat:
    return "zarr" if ZarrVolume.matches(url) else "precomputed"


def put_atomic(directory: str, name: str, content: bytes) -> None:
    """Write ``directory/name`` so readers see the old file or the whole new one, never a part."""
    if directory.startswith("file://"):
        path = Path(directory.removeprefix("file://")) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_bytes(content)
        os.replace(tmp, path)
    else:  # object stores replace whole objects atomically
        from cloudfiles import CloudFiles

        CloudFiles(directory).put(name, content, compress=None)


def _get(directory: str, name: str) -> bytes | None:
    from cloudfiles import CloudFiles

    return CloudFiles(directory).get(name)


def manifest_url(layer_url: str) -> str:
    return f"{_layer_dir(layer_url)}/{MANIFEST_NAME}"


def read_manifest(layer_url: str) -> pa.Table:
    """The manifest written by :func:`ingest` next to a layer."""
    content = _get(_layer_dir(layer_url), MANIFEST_NAME)
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
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "foreground_fraction": None,
        "n_ids": None,
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


def _open_or_create_destination(
    source: Volume,
    dst: str,
    *,
    chunk_shape: tuple[int, int, int],
    layer_type: LayerType,
    dtype: np.dtype,
    overwrite: bool,
) -> Volume:
    spec = {
        "shape": source.shape,
        "dtype": dtype,
        "chunk_shape": tuple(min(c, s) for c, s in zip(chunk_shape, source.shape, strict=True)),
        "voxel_size": source.voxel_size,
        "layer_type": layer_type,
        "num_channels": source.num_channels,
    }
    if not overwrite:
        try:
            existing = open_volume(dst, "r+")
        except VolumeError:
            existing = None
        if existing is not None:
            found = (existing.shape, existing.dtype, existing.chunk_shape, existing.num_channels)
            wanted = (spec["shape"], dtype, spec["chunk_shape"], source.num_channels)
            if found != wanted:
                raise VolumeError(
                    f"{dst} already holds a different layer (shape, dtype, chunks, channels = "
                    f"{found}, this ingest needs {wanted}); choose another destination or "
                    "pass --overwrite"
                )
            return existing
    return create_volume(dst, format=format_of_output(dst), overwrite=True, **spec)


def ingest(
    src: str | Volume,
    dst: str,
    *,
    chunk_shape: tuple[int, int, int] = (64, 64, 64),
    labels: bool | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_chunk: Callable[[Box], None] | None = None,
) -> IngestResult:
    """Copy ``src`` into a chunked layer at ``dst`` (precomputed, or zarr v3 for ``*.zarr``).

    ``labels`` forces a segmentation (True) or image (False) layer; by default 32/64-bit integer
    sources become segmentation layers. Rerunning after an interruption writes only the chunks
    that were not finished. ``on_chunk`` is called after each chunk is durably written.
    """
    source = src if isinstance(src, Volume) else open_volume(src)
    if any(VOLUME_FORMATS.get(name).matches(dst) for name in ("hdf5", "tiff", "npy")):
        raise VolumeError(f"{dst}: ingest writes precomputed layers or .zarr arrays only")
    layer_type = _layer_type_for(source, labels)
    dtype = _output_dtype(source, layer_type)
    destination = _open_or_create_destination(
        source,
        dst,
        chunk_shape=tuple(int(c) for c in chunk_shape),  # type: ignore[arg-type]
        layer_type=layer_type,
        dtype=dtype,
        overwrite=overwrite,
    )
    directory = _layer_dir(dst)
    boxes = list(chunk_grid(destination.bounds, destination.chunk_shape))
    rows: list[dict[str, Any]] = []
    written = skipped = 0
    nbytes = 0
    started = time.perf_counter()
    bar = tqdm(boxes, desc=f"ingest {Path(dst).name}", unit="chunk", disable=not progress)
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
        rows.append(
            {
                **dict(zip(("z0", "y0", "x0", "z1", "y1", "x1"), box.to_list(), strict=True)),
                **{k: marker[k] for k in ("mean", "std", "foreground_fraction", "n_ids")},
            }
        )
    sink = io.BytesIO()
    pq.write_table(_manifest_table(rows), sink)
    put_atomic(directory, MANIFEST_NAME, sink.getvalue())
    return IngestResult(
        url=dst,
        manifest_url=f"{directory}/{MANIFEST_NAME}",
        chunks_written=written,
        chunks_skipped=skipped,
        seconds=time.perf_counter() - started,
        megabytes=nbytes / 1e6,
    )


def _read_marker(directory: str, box: Box) -> dict[str, Any] | None:
    content = _get(directory, _marker_name(box))
    if content is None:
        return None
    try:
        marker = json.loads(content)
    except ValueError:  # a torn marker: redo the chunk
        return None
    return marker if marker.get("box") == box.to_list() else None
