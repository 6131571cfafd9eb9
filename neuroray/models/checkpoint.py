"""The checkpoint contract: what a neuroray checkpoint holds, how it is written and read.

Training (:mod:`neuroray.trainers.loop`) writes checkpoints; fine-tuning (a pretraining
checkpoint as ``model.init``), blockwise inference and other tools read them through this module,
so none of them needs the training code.

**Checkpoint format**::

    checkpoint_dir/
      model.pt        {"format": "neuroray.checkpoint/1", "kind": task kind ("mae", "dbmim",
                       "mscon", "finetune_em", ...), "step": int, "state_dict": model weights
                       (no DDP prefix), "encoder_prefix": where the ViT3D encoder's keys start
                       ("encoder." for MAE), "job": the job config as JSON,
                       "postprocess": choices made on validation that inference reuses, e.g.
                       {"threshold": 0.25} (fine-tuning; optional)}
      train_state.pt  {"optimizer", "scheduler", "step", "extras": task state} (training only)
      job.json        the job config (also inside model.pt)

Both files load with ``torch.load(..., weights_only=True)``. Ray Train registers a checkpoint
only after it is fully persisted, so a reader never sees half of one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from neuroray.errors import NeurorayError
from neuroray.paths import is_remote

CHECKPOINT_FORMAT = "neuroray.checkpoint/1"


def load_tensors(path: Path) -> dict[str, Any]:
    """A checkpoint file, without running pickled code (weights_only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def write_model_file(
    directory: Path,
    *,
    kind: str,
    step: int,
    state_dict: Mapping[str, torch.Tensor],
    encoder_prefix: str,
    job_json: str,
    postprocess: Mapping[str, float] | None = None,
) -> None:
    """Write ``model.pt`` and ``job.json`` of a checkpoint into ``directory``."""
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "kind": kind,
            "step": step,
            "state_dict": state_dict,
            "encoder_prefix": encoder_prefix,
            "job": job_json,
            "postprocess": dict(postprocess or {}),
        },
        directory / "model.pt",
    )
    (directory / "job.json").write_text(job_json)


def load_model_checkpoint(path: str | Path) -> dict[str, Any]:
    """``model.pt`` of a checkpoint (a checkpoint directory, a run directory or the file).

    A checkpoint directory on a bucket (``s3://…/checkpoint_…``, ``gs://…``) is downloaded first.
    """
    if is_remote(str(path)):
        from ray.train import Checkpoint

        path = Checkpoint(str(path)).to_directory()
    path = Path(path)
    if path.is_dir() and not (path / "model.pt").exists():
        path = latest_checkpoint(path)
    file = path / "model.pt" if path.is_dir() else path
    if not file.is_file():
        raise NeurorayError(f"no neuroray checkpoint at {path} (expected model.pt inside)")
    try:
        checkpoint = load_tensors(file)
    except Exception as err:
        raise NeurorayError(f"{file} is not a readable neuroray checkpoint: {err}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise NeurorayError(f"{file} is not a neuroray checkpoint ({CHECKPOINT_FORMAT})")
    return checkpoint


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The newest ``checkpoint_*`` directory of a run (Ray Train names them by time)."""
    run_dir = Path(run_dir)
    found = sorted(p for p in run_dir.glob("checkpoint_*") if (p / "model.pt").exists())
    if not found:
        raise NeurorayError(f"run {run_dir} has no finished checkpoint yet")
    return found[-1]
