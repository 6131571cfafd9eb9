"""Segment a whole volume in blocks as Ray tasks: predict → agglomerate → stitch → relabel.

1. **predict**: each block (plus a context margin) goes through the fine-tuned UNETR with
   blended sliding windows; the block's core is written to an ``affinities`` (EM) or
   ``probabilities`` (binary) precomputed layer, uint8-quantised, one chunk per block.
2. **agglomerate** (EM): each block is segmented with fragments + waterz on its core plus a
   ``halo`` from its neighbours' predictions, ids made unique per block (``block << 32 | id``),
   and its core written to a ``blocks`` layer. The halo beyond each of its upper faces is kept.
3. **stitch**: across every face, a block's halo labels are compared with its neighbour's core
   labels over the same voxels; segments that are each other's majority overlap are merged
   (union-find). Objects are therefore not cut at block faces.
4. **relabel**: every block's core is mapped to final consecutive ids in ``segmentation``.
   Binary tasks (mito, LM) threshold the probabilities into a ``segmentation`` mask instead.

Resumable: each finished block of each stage leaves a marker (after its data is written), and
a rerun skips marked blocks. A failed block fails the job loudly, naming the blocks, after the
other blocks finish; a rerun then does only what is missing. Markers, the output's fingerprint
and its layers are :mod:`neuroray.segmentation.block_output`; stitching is
:mod:`neuroray.segmentation.stitch`.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import fastremap
import numpy as np
import ray
from pydantic import Field, NonNegativeInt, PositiveInt, model_validator
from tqdm import tqdm

from neuroray.config import RaySettings, StrictModel
from neuroray.errors import NeurorayError
from neuroray.paths import InputPath, OutputPath, check_inputs, local_file
from neuroray.platform.augment import as_float_image
from neuroray.platform.box import Box, chunk_grid
from neuroray.platform.storage import put_atomic
from neuroray.platform.volume import local_path, open_volume
from neuroray.segmentation.block_output import (
    Markers,
    ensure_layer,
    fingerprint,
    prepare_output,
)
from neuroray.segmentation.stitch import stitch
from neuroray.segmentation.tasks import TaskName, get_task

BLOCK_ID_SHIFT = np.uint64(32)


DEFAULT_THRESHOLD = 0.5
"""The threshold for checkpoints that recorded none (and for ``affinities`` without a model)."""


class SegmentJob(StrictModel):
    """``neuroray segment``: which model, which image, where to write, and how to cut blocks."""

    checkpoint: InputPath | None = None
    """A fine-tuning run, checkpoint directory or model.pt; not needed with ``affinities``."""
    image: InputPath | None = None
    affinities: InputPath | None = None
    """An existing affinities layer: skip prediction and only agglomerate it (EM)."""
    output: OutputPath = Field("segmentation_out", validate_default=True)
    roi: tuple[NonNegativeInt, NonNegativeInt, NonNegativeInt, int, int, int] | None = None
    """z0, y0, x0, z1, y1, x1 (start inclusive, stop exclusive)."""
    block_shape: tuple[PositiveInt, PositiveInt, PositiveInt] = (32, 128, 128)
    context: tuple[NonNegativeInt, NonNegativeInt, NonNegativeInt] | None = None
    """Extra input around each block for prediction (default: a quarter of the model window)."""
    halo: tuple[NonNegativeInt, NonNegativeInt, NonNegativeInt] = (4, 16, 16)
    """Overlap used to segment each block together with its neighbours' voxels, for stitching."""
    threshold: float | None = Field(None, gt=0, lt=1)
    """waterz merge threshold (EM) or foreground threshold. Default: the one the fine-tune chose
    on its validation region (stored in the checkpoint); 0.5 where there is none."""
    task: TaskName | None = None
    """em | mito | lm; read from the checkpoint when not given."""
    cpus_per_task: float = Field(1.0, gt=0)
    multiscale: bool = False
    """Add downsampled levels to the output layers (Igneous: images averaged, segmentation by
    each block's mode), so Neuroglancer (``neuroray view``) shows large outputs fast."""
    mesh: bool = False
    """Mesh the segmentation's objects (Igneous + zmesh) so ``neuroray view`` shows them in 3D."""
    mesh_min_voxels: PositiveInt = 100
    """Objects with fewer voxels in the whole output get no mesh."""
    overwrite: bool = False
    fail_on_blocks: list[int] = []
    """Fault injection for drills and tests: these blocks' workers die once, in the first stage
    (predict, or agglomerate when given affinities)."""
    fail_mode: Literal["before_write", "torn_write"] = "before_write"
    """How the ``fail_on_blocks`` workers die: before writing anything, or mid-write, leaving
    their output chunk truncated on disk (a torn chunk) and no completion marker."""
    ray: RaySettings = RaySettings()

    @model_validator(mode="after")
    def _roi_not_empty(self) -> SegmentJob:
        if self.roi is not None and any(
            a >= b for a, b in zip(self.roi[:3], self.roi[3:], strict=True)
        ):
            raise ValueError(f"roi {list(self.roi)} must have start < stop on every axis")
        return self


@dataclass
class StageReport:
    stage: str
    done: int
    skipped: int
    seconds: float


@dataclass
class SegmentResult:
    output: str
    layers: dict[str, str]
    stages: list[StageReport]
    voxels: int
    threshold: float
    """The threshold used (given, or the one the checkpoint's validation chose)."""

    def summary(self) -> str:
        parts = [
            f"{s.stage}: {s.done} blocks ({s.skipped} already done) {s.seconds:.1f} s"
            for s in self.stages
        ]
        return f"{self.output} (threshold {self.threshold:g}): " + "; ".join(parts)


# ---------------------------------------------------------------------- model loading in tasks
def load_segmenter(checkpoint: str) -> tuple[Any, Any]:
    """The fine-tuned segmenter of a checkpoint (weights loaded, eval mode) and a
    :class:`~neuroray.models.segmenter.SegmenterCheckpoint` (``task``, ``out_channels``,
    ``window``, the ``threshold`` validation chose): the checkpoint contract in models/, no training code. Imported
    here lazily, so that importing this module stays free of torch."""
    from neuroray.models.segmenter import load_segmenter as from_checkpoint

    return from_checkpoint(checkpoint)


# ---------------------------------------------------------------------- block tasks
def _blocks(bounds: Box, block_shape: Sequence[int]) -> list[Box]:
    return list(chunk_grid(bounds, block_shape))


def _fail_once(config: SegmentJob, block: int) -> None:
    """Fault injection (``fail_on_blocks``, ``fail_mode="before_write"``): the block's worker
    process dies once on entry to the block task (``os._exit``: no exception, no cleanup), as a
    preempted node's would."""
    if config.fail_mode != "before_write" or not _first_failure(config, block):
        return
    os._exit(1)  # a real worker death, as a preempted node would give


def _first_failure(config: SegmentJob, block: int) -> bool:
    """True the first time ``block`` is asked to fail (a flag file under the output)."""
    flag = Path(config.output) / ".neuroray" / "blockwise" / f"injected_failure_{block}"
    if flag.exists():
        return False
    flag.parent.mkdir(parents=True, exist_ok=True)
    flag.write_text("1")
    return True


def _write_block(
    config: SegmentJob, block: int, url: str, box: Box, data: np.ndarray, *, drill: bool
) -> None:
    """Write a block's output chunk; in a fault drill (``drill`` and ``fail_mode="torn_write"``)
    the first write of a ``fail_on_blocks`` block is torn instead: the chunk is written, every
    file that write touched is cut to half its length, and the worker dies before its marker.
    Local outputs only."""
    tear = (drill and config.fail_mode == "torn_write" and block in config.fail_on_blocks
            and _first_failure(config, block))  # fmt: skip
    with _drill_lock(config):
        root = Path(local_path(url)) if tear else None
        before = _file_times(root) if root else {}
        open_volume(url, "r+").write(box, data)
        if root:
            for path, mtime in _file_times(root).items():
                if before.get(path) != mtime:
                    with path.open("r+b") as f:
                        f.truncate(path.stat().st_size // 2)
            os._exit(1)  # a real worker death, as a preempted node would give


@contextlib.contextmanager
def _drill_lock(config: SegmentJob) -> Iterator[None]:
    """While a fault drill runs, every block's write holds one lock file, so the files a torn
    write touched are its own and never a neighbour's written at the same moment (that torn
    chunk would carry its block's completion marker, and no rerun would rewrite it)."""
    if not config.fail_on_blocks:
        yield
        return
    path = Path(config.output) / ".neuroray" / "blockwise" / "drill.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the kernel releases it when the worker dies
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _file_times(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def predict_block(
    config_json: str, weights_ref: Any, index: int, box_list: list[int], out_url: str
) -> int:
    import torch

    from neuroray.segmentation.inference import predict_array

    config = SegmentJob.model_validate_json(config_json)
    if index in config.fail_on_blocks:
        _fail_once(config, index)
    torch.set_num_threads(max(1, int(config.cpus_per_task)))
    model, job = weights_ref
    window = job.window
    context = config.context or tuple(w // 4 for w in window)
    image = open_volume(config.image)
    core = Box.from_list(box_list)
    region = core.grow(context).intersect(image.bounds)
    data = image.read(region)
    data = as_float_image(data)
    probs = predict_array(model, data, window)
    core_probs = probs[(slice(None), *core.relative_to(region))]
    quantised = np.clip(np.rint(core_probs * 255), 0, 255).astype(np.uint8)
    _write_block(config, index, out_url, core, quantised, drill=True)
    Markers(config.output).mark("predict", index)
    return index


def agglomerate_block(
    config_json: str,
    index: int,
    box_list: list[int],
    affs_url: str,
    blocks_url: str,
    bounds_list: list[int],
) -> int:
    from neuroray.segmentation.inference import segment_affinities

    config = SegmentJob.model_validate_json(config_json)
    if index in config.fail_on_blocks and config.affinities is not None:
        _fail_once(config, index)
    affinities = open_volume(affs_url)
    core = Box.from_list(box_list)
    region = core.grow(config.halo).intersect(Box.from_list(bounds_list))
    affs = affinities.read(region).astype(np.float32) / 255.0
    seg = segment_affinities(affs, [config.threshold], voxel_size=affinities.voxel_size)[
        config.threshold
    ]
    seg = seg.astype(np.uint64)
    nonzero = seg != 0
    seg[nonzero] |= np.uint64(index + 1) << BLOCK_ID_SHIFT
    # the drill fails the first stage: this one only when given affinities (no predict)
    drill = config.affinities is not None
    _write_block(config, index, blocks_url, core, seg[core.relative_to(region)], drill=drill)
    halos = {}
    for axis in range(3):  # the halo beyond this block's upper face along each axis
        start = list(core.start)
        start[axis] = core.stop[axis]
        stop = list(region.stop)
        slab = Box(start, stop).intersect(region)
        if not slab.empty:
            halos[f"{axis}"] = seg[slab.relative_to(region)]
            halos[f"{axis}_box"] = np.asarray(slab.to_list())
    halos["ids"] = np.unique(seg[core.relative_to(region)])
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **halos)
    put_atomic(f"file://{Markers(config.output).root / 'halos'}", f"{index}.npz", buffer.getvalue())
    Markers(config.output).mark("agglomerate", index)
    return index


def relabel_block(
    config_json: str,
    index: int,
    box_list: list[int],
    blocks_url: str,
    seg_url: str,
    mapping_ref: Any,
) -> int:
    config = SegmentJob.model_validate_json(config_json)
    core = Box.from_list(box_list)
    keys, values = mapping_ref
    labels = open_volume(blocks_url).read(core)
    lookup = dict(zip(keys.tolist(), values.tolist(), strict=True))
    lookup[0] = 0
    relabelled = fastremap.remap(labels, lookup, preserve_missing_labels=False, in_place=False)
    open_volume(seg_url, "r+").write(core, relabelled)
    Markers(config.output).mark("relabel", index)
    return index


def threshold_block(
    config_json: str, index: int, box_list: list[int], probs_url: str, seg_url: str
) -> int:
    config = SegmentJob.model_validate_json(config_json)
    core = Box.from_list(box_list)
    probs = open_volume(probs_url).read(core)
    open_volume(seg_url, "r+").write(core, (probs > config.threshold * 255).astype(np.uint8))
    Markers(config.output).mark("threshold", index)
    return index


# ---------------------------------------------------------------------- the driver
def _run_stage(
    name: str,
    blocks: list[Box],
    markers: Markers,
    submit: Callable[[int, Box], Any],
    progress: bool,
) -> StageReport:
    started = time.perf_counter()
    todo = [i for i in range(len(blocks)) if not markers.done(name, i)]
    refs = {submit(i, blocks[i]): i for i in todo}
    failures: dict[int, str] = {}
    with tqdm(total=len(todo), desc=name, unit="block", disable=not progress) as bar:
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(ready[0])
            except Exception as err:  # collect every failure, then fail loudly
                failures[refs[ready[0]]] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
            bar.update(1)
    if failures:
        first = next(iter(failures.values()))
        raise NeurorayError(
            f"{len(failures)} of {len(blocks)} blocks failed in stage {name!r} "
            f"(blocks {sorted(failures)}; first: {first}). Finished blocks are kept: rerun the "
            "same command to do only the missing ones."
        )
    return StageReport(name, len(todo), len(blocks) - len(todo), time.perf_counter() - started)


def segment(config: SegmentJob, progress: bool = True) -> SegmentResult:
    """Run the stages of the module docstring; returns the layers written and per-stage counts."""
    from neuroray.runtime import connect_to

    if config.affinities is None and (config.checkpoint is None or config.image is None):
        raise NeurorayError("segment needs checkpoint + image, or an existing affinities layer")
    check_inputs(config)
    if local_file(config.output) is None:
        raise NeurorayError(f"output {config.output}: segment writes to a local folder only")
    out = Path(config.output)
    model = job = None
    if config.affinities is None:  # everything that can fail on input fails before Ray starts
        model, job = load_segmenter(config.checkpoint)
        image = open_volume(config.image)
        bounds = _bounds(config, image.bounds)
    else:
        bounds = _bounds(config, open_volume(config.affinities).bounds)
    task = "em" if job is None else (config.task or job.task)
    if config.threshold is None:
        chosen = job.threshold if job is not None else None
        threshold = DEFAULT_THRESHOLD if chosen is None else chosen
        config = config.model_copy(update={"threshold": threshold})
    prepare_output(out, fingerprint(config, task), overwrite=config.overwrite)
    connect_to(config.ray)
    markers = Markers(str(out))
    config_json = config.model_dump_json()
    stages: list[StageReport] = []
    layers: dict[str, str] = {}
    task_options = {"num_cpus": config.cpus_per_task, "max_retries": 0}
    blocks = _blocks(bounds, config.block_shape)

    if config.affinities is None:
        pred_name = get_task(task).prediction_layer
        pred_url = str(out / pred_name)
        ensure_layer(pred_url, image, config.block_shape, "uint8", job.out_channels, "image")
        weights_ref = ray.put((model, job))
        remote = ray.remote(predict_block).options(**task_options)
        stages.append(
            _run_stage(
                "predict",
                blocks,
                markers,
                lambda i, b: remote.remote(config_json, weights_ref, i, b.to_list(), pred_url),
                progress,
            )
        )
        layers[pred_name] = pred_url
        reference = image
    else:
        pred_url = config.affinities
        reference = open_volume(pred_url)
        layers["affinities"] = pred_url

    seg_url = str(out / "segmentation")
    if get_task(task).instances:  # agglomerate blocks, stitch them, relabel
        blocks_url = str(out / "blocks")
        ensure_layer(blocks_url, reference, config.block_shape, "uint64", 1, "segmentation")
        remote = ray.remote(agglomerate_block).options(**task_options)
        stages.append(
            _run_stage(
                "agglomerate",
                blocks,
                markers,
                lambda i, b: remote.remote(
                    config_json, i, b.to_list(), pred_url, blocks_url, bounds.to_list()
                ),
                progress,
            )
        )
        t0 = time.perf_counter()
        mapping_path = markers.root / "mapping.npz"
        if not mapping_path.exists():
            keys, values = stitch(str(out), blocks, blocks_url)
            buffer = io.BytesIO()
            np.savez(buffer, keys=keys, values=values)
            put_atomic(f"file://{markers.root}", "mapping.npz", buffer.getvalue())
        with np.load(mapping_path) as saved:
            mapping_ref = ray.put((saved["keys"], saved["values"]))
        stages.append(StageReport("stitch", 1, 0, time.perf_counter() - t0))
        ensure_layer(seg_url, reference, config.block_shape, "uint64", 1, "segmentation")
        remote = ray.remote(relabel_block).options(**task_options)
        stages.append(
            _run_stage(
                "relabel",
                blocks,
                markers,
                lambda i, b: remote.remote(
                    config_json, i, b.to_list(), blocks_url, seg_url, mapping_ref
                ),
                progress,
            )
        )
    else:
        ensure_layer(seg_url, reference, config.block_shape, "uint8", 1, "segmentation")
        remote = ray.remote(threshold_block).options(**task_options)
        stages.append(
            _run_stage(
                "threshold",
                blocks,
                markers,
                lambda i, b: remote.remote(config_json, i, b.to_list(), pred_url, seg_url),
                progress,
            )
        )
    layers["segmentation"] = seg_url
    stages += _views(config, [url for url in layers.values() if Path(url).parent == out], seg_url)
    return SegmentResult(str(out), layers, stages, bounds.size, config.threshold)


def _views(config: SegmentJob, outputs: list[str], seg_url: str) -> list[StageReport]:
    """``multiscale`` and ``mesh``: Igneous's downsampling and meshing of the layers this run
    wrote, as Ray tasks (see :mod:`neuroray.platform.multiscale`)."""
    from neuroray.platform.multiscale import add_levels, add_meshes

    stages = []
    if config.multiscale:
        t0 = time.perf_counter()
        for url in outputs:
            add_levels(url)
        stages.append(StageReport("multiscale", len(outputs), 0, time.perf_counter() - t0))
    if config.mesh:
        t0 = time.perf_counter()
        count = add_meshes(
            seg_url, block_shape_zyx=config.block_shape, dust_threshold=config.mesh_min_voxels
        )
        stages.append(StageReport("mesh", count, 0, time.perf_counter() - t0))
    return stages


def _bounds(config: SegmentJob, volume_bounds: Box) -> Box:
    if config.roi is None:
        return volume_bounds
    roi = Box.from_list(config.roi).intersect(volume_bounds)
    if roi.empty or any(a % b for a, b in zip(roi.start, config.block_shape, strict=True)):
        raise NeurorayError(
            f"roi {Box.from_list(config.roi)} must lie in the volume {volume_bounds} and start at "
            f"a multiple of block_shape {config.block_shape} (output chunks are blocks)"
        )
    return roi
