"""What a blockwise output folder holds, how it records its inputs, and when it may resume.

``<output>/.neuroray/blockwise/<stage>/<block>.json`` marks each finished block of each stage;
``<output>/.neuroray/fingerprint.json`` records the checkpoint, image and settings the output was
made with (:mod:`neuroray.platform.provenance`), so a rerun resumes only the same work, is
refused otherwise, and ``overwrite`` clears only what is stale.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuroray.errors import NeurorayError
from neuroray.paths import local_file
from neuroray.platform.provenance import (
    differences,
    file_identity,
    local_dir,
    read_fingerprint,
    source_identity,
    write_fingerprint,
)
from neuroray.platform.storage import put_atomic, remove_tree
from neuroray.platform.volume import create_volume, open_volume

if TYPE_CHECKING:
    from neuroray.segmentation.blockwise import SegmentJob


class Markers:
    """Per-stage, per-block completion markers under ``<output>/.neuroray/blockwise``."""

    def __init__(self, output: str) -> None:
        self.root = Path(output) / ".neuroray" / "blockwise"

    def done(self, stage: str, block: int) -> bool:
        return (self.root / stage / f"{block}.json").exists()

    def mark(self, stage: str, block: int, info: dict[str, Any] | None = None) -> None:
        put_atomic(f"file://{self.root / stage}", f"{block}.json", json.dumps(info or {}).encode())


PREDICTION_LAYERS = ("affinities", "probabilities")
SEGMENTATION_LAYERS = ("blocks", "segmentation")
LATER_STAGES = ("agglomerate", "halos", "relabel", "threshold", "mapping.npz")


def _checkpoint_identity(checkpoint: str) -> dict[str, Any]:
    """The model file a checkpoint argument resolves to now (a run's newest checkpoint)."""
    from neuroray.models.checkpoint import latest_checkpoint

    path = local_file(checkpoint)
    if path is None:
        return {"url": checkpoint}
    if path.is_dir() and not (path / "model.pt").exists():
        path = latest_checkpoint(path)
    return file_identity(path / "model.pt" if path.is_dir() else path)


def fingerprint(config: SegmentJob, task: str) -> dict[str, Any]:
    """What the output's predictions and its segmentation depend on (see provenance.py)."""
    prediction = None
    if config.affinities is None:
        prediction = {
            "checkpoint": _checkpoint_identity(config.checkpoint),
            "image": source_identity(config.image),
            "roi": config.roi,
            "block_shape": list(config.block_shape),
            "context": config.context,
        }
    segmentation = {
        "affinities": source_identity(config.affinities) if config.affinities else None,
        "roi": config.roi,
        "block_shape": list(config.block_shape),
        "halo": list(config.halo),
        "threshold": config.threshold,
        "task": task,
    }
    return json.loads(json.dumps({"predict": prediction, "segment": segmentation}))


def prepare_output(out: Path, wanted: dict[str, Any], *, overwrite: bool) -> None:
    """Resume an output with the same fingerprint; refuse another unless ``overwrite``, which
    clears what is stale (only the segmentation stages when the predictions still hold)."""
    root = out / ".neuroray"
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not root.is_dir()):
        raise NeurorayError(
            f"output {out} holds files that `neuroray segment` did not write; "
            "choose a new or empty folder"
        )
    found = read_fingerprint(local_dir(out))
    if found is None and (root / "blockwise").is_dir() and not overwrite:
        raise NeurorayError(
            f"output {out} holds blocks with no record of what made them; pass overwrite=true"
        )
    found = found or {}
    stale_prediction = found.get("predict") != wanted["predict"]
    stale_segmentation = stale_prediction or found.get("segment") != wanted["segment"]
    if found and stale_segmentation and not overwrite:
        changed = differences(found, wanted)
        raise NeurorayError(
            f"output {out} was written with other inputs or settings ({'; '.join(changed[:3])}); "
            "pass overwrite=true to redo it, or choose another output"
        )
    if overwrite:
        stale = [*SEGMENTATION_LAYERS, *(f".neuroray/blockwise/{s}" for s in LATER_STAGES)]
        if wanted["predict"] is not None and stale_prediction:
            stale += [*PREDICTION_LAYERS, ".neuroray/blockwise"]
        for name in stale:
            remove_tree(local_dir(out / name))
    write_fingerprint(local_dir(out), wanted)


def ensure_layer(
    url: str,
    like: Any,
    block_shape: Sequence[int],
    dtype: str,
    channels: int,
    layer_type: str,
) -> None:
    """Create an output layer shaped like the input (one chunk per block) unless resuming."""
    try:
        existing = open_volume(url)
    except NeurorayError:
        existing = None
    if existing is not None:
        if existing.shape != like.shape or existing.num_channels != channels:
            raise NeurorayError(
                f"{url} exists with another shape; use a new output or overwrite=true"
            )
        return
    create_volume(
        url,
        shape=like.shape,
        dtype=dtype,
        chunk_shape=block_shape,
        voxel_size=like.voxel_size,
        layer_type=layer_type,
        num_channels=channels,
        overwrite=True,
        format="precomputed",
    )
