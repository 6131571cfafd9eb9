"""MAE pretraining on Ray Train: resume after failures, checkpoints, TensorBoard."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from neuroray.config import validate
from neuroray.models.checkpoint import load_model_checkpoint
from neuroray.models.unetr import UNETR, load_encoder
from neuroray.models.vit3d import ViTConfig, build_vit3d
from neuroray.platform.ingest import ingest
from neuroray.trainers.loop import read_starts
from neuroray.trainers.pretrain import MAEJob, pretrain

ENCODER = {"size": None, "width": 48, "depth": 2, "heads": 2, "img_size": [16, 64, 64]}


@pytest.fixture(scope="module")
def medulla_raw(em_raw, tmp_path_factory):
    """The unlabelled FIB-SEM cube (or a synthetic EM cube), ingested as a precomputed layer."""
    from neuroray.platform.volume import open_volume

    source = open_volume(em_raw.raw)
    url = str(tmp_path_factory.mktemp("medulla") / "raw")
    ingest(source, url, chunk_shape=(64, 64, 64), progress=False)
    return url


def _job(storage, name, steps, **run):
    return validate(MAEJob, {
        "data": {"image": "", "sampler": {"crop_shape": [16, 64, 64]}, "num_servers": 1,
                 "cache_mb": 64},
        "model": {"encoder": ENCODER, "decoder_width": 32, "decoder_depth": 1, "decoder_heads": 2},
        "run": {"name": name, "storage_path": str(storage), "steps": steps, "batch_size": 2,
                "checkpoint_every": 3, "report_every": 3, "preview_every": 3, **run},
    })


def _tensorboard_losses(job) -> list[tuple[int, float]]:
    """(step, train/loss) as logged, from every events file of the run (all its starts)."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    losses = []
    events = EventMultiplexer().AddRunsFromDirectory(str(job.run.tensorboard_path()))
    events.Reload()
    for run in events.Runs():
        if "train/loss" in events.GetAccumulator(run).Tags()["scalars"]:
            losses += [(e.step, e.value) for e in events.Scalars(run, "train/loss")]
    return sorted(losses)


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_killed_worker_process_resumes_to_the_same_weights_as_an_undisturbed_run(
    ray_session, medulla_raw, tmp_path
):
    """The Train worker process dies (os._exit, no Python exception) at step 5; Ray Train
    restarts it from the step-3 checkpoint. Crops, masks and initial weights are seeded by
    (seed, rank, step) and CPU kernels run on one thread, so the recovered run must end with
    bitwise the same weights and losses as a run that was never disturbed.

    Reports every step: ``ray.train.report`` only queues a report in the worker (a queue of one)
    and the controller collects it at its next poll, so a process that dies within a poll of
    reporting a checkpoint loses it and restarts from the one before (here: from scratch). With
    a report per step, the step-4 report waits until the step-3 checkpoint was collected."""
    job = _job(tmp_path, "killed", steps=8, fail_at_step=5, fail_mode="exit", max_failures=1,
               report_every=1)
    job.data.image = medulla_raw
    result = pretrain(job)
    assert result.metrics["step"] == 8
    injected = json.loads((tmp_path / "killed" / ".injected_failure").read_text())
    assert injected["step"] == 5 and injected["mode"] == "exit"
    assert _process_gone(injected["pid"])  # the worker process really died
    assert read_starts(job.run) == [0, 3]  # resumed from the step-3 checkpoint
    killed = load_model_checkpoint(result.checkpoint.path)

    clean_job = _job(tmp_path, "clean", steps=8, report_every=1)
    clean_job.data.image = medulla_raw
    clean_result = pretrain(clean_job)
    assert read_starts(clean_job.run) == [0]
    clean = load_model_checkpoint(clean_result.checkpoint.path)

    assert killed["step"] == clean["step"] == 8
    assert killed["state_dict"].keys() == clean["state_dict"].keys()
    differ = [k for k, v in clean["state_dict"].items() if not torch.equal(v, killed["state_dict"][k])]
    assert not differ, f"weights differ from the undisturbed run: {differ}"
    clean_losses = dict(_tensorboard_losses(clean_job))
    assert sorted(clean_losses) == list(range(1, 9))
    losses = _tensorboard_losses(job)  # steps 1-4 from the first start, 4-8 after the restart
    assert sorted({step for step, _ in losses}) == list(range(1, 9))
    assert all(loss == clean_losses[step] for step, loss in losses), (losses, clean_losses)

    longer = job.model_copy(update={"run": job.run.model_copy(update={"steps": 11})})
    result = pretrain(longer)
    assert read_starts(job.run) == [0, 3, 8]  # continued, did not restart
    assert result.metrics["step"] == 11


def test_checkpoint_contract_and_tensorboard(ray_session, medulla_raw, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    job = _job(tmp_path, "contract", steps=3)
    job.data.image = medulla_raw
    job.run.progress = "lines"
    result = pretrain(job)
    # the driver's progress: the TensorBoard command, a line per report, the curves beside the
    # checkpoints
    out = capsys.readouterr().out
    assert f"tensorboard --logdir {job.run.tensorboard_path()}" in out
    assert re.search(r"\[contract\] step 3/3 \(100%\) \| loss [0-9.e-]+ \| [0-9.e+]+ samples/s \| "
                     r"ETA 0s \| checkpoint", out), out  # fmt: skip
    assert (tmp_path / "contract" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert f"training curves: {tmp_path / 'contract' / 'loss.png'}" in out
    checkpoint = load_model_checkpoint(result.checkpoint.path)
    assert checkpoint["kind"] == "mae" and checkpoint["encoder_prefix"] == "encoder."
    saved = MAEJob.model_validate_json(checkpoint["job"])
    assert saved.run.cpus_per_worker >= 1  # the CPUs Ray had free, resolved when the run started
    saved.run.cpus_per_worker = job.run.cpus_per_worker
    assert saved == job
    # fine-tuning loads the encoder at another crop size, position embeddings resized
    encoder = build_vit3d(ViTConfig.model_validate({**ENCODER, "img_size": [32, 128, 128],
                                                     "pos_embed": "learned"}))
    report = load_encoder(UNETR(encoder, out_channels=3), checkpoint["state_dict"])
    assert not report.missing and report.resized

    events = EventAccumulator(str(job.run.tensorboard_path()))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_pix", "train/mask_ratio", "train/lr",
            "train/samples_per_s"} <= scalars
    assert "pretrain/input_mask_reconstruction" in events.Tags()["images"]
