"""MAE pretraining on Ray Train: resume after failures, checkpoints, TensorBoard."""

from __future__ import annotations

import pytest

from neuroray.config import validate
from neuroray.models.unetr import UNETR, load_encoder
from neuroray.models.vit3d import ViTConfig, build_vit3d
from neuroray.platform.ingest import ingest
from neuroray.trainers.loop import load_model_checkpoint, read_starts
from neuroray.trainers.pretrain import PretrainJob, pretrain

ENCODER = {"size": None, "width": 48, "depth": 2, "heads": 2, "img_size": [16, 64, 64]}


@pytest.fixture(scope="module")
def medulla_raw(data_dir, tmp_path_factory):
    """A corner of the unlabelled FIB-SEM cube, ingested as a precomputed layer."""
    from neuroray.platform.volume import open_volume

    source = open_volume(f"{data_dir}/em/fib_medulla_s1_raw.h5#raw")
    url = str(tmp_path_factory.mktemp("medulla") / "raw")
    ingest(source, url, chunk_shape=(64, 64, 64), progress=False)
    return url


def _job(storage, name, steps, **run):
    return validate(PretrainJob, {
        "data": {"image": "", "sampler": {"crop_shape": [16, 64, 64]}, "num_servers": 1,
                 "cache_mb": 64},
        "model": {"encoder": ENCODER, "decoder_width": 32, "decoder_depth": 1, "decoder_heads": 2},
        "run": {"name": name, "storage_path": str(storage), "steps": steps, "batch_size": 2,
                "checkpoint_every": 3, "report_every": 3, "preview_every": 3, **run},
    })


def test_failure_recovers_and_rerun_continues(ray_session, medulla_raw, tmp_path):
    job = _job(tmp_path, "resume", steps=8, fail_at_step=5, max_failures=1)
    job.data.image = medulla_raw
    result = pretrain(job)
    assert result.metrics["step"] == 8
    assert read_starts(job.run) == [0, 3]  # failed at 5, resumed from the step-3 checkpoint
    assert load_model_checkpoint(result.checkpoint.path)["step"] == 8

    longer = job.model_copy(update={"run": job.run.model_copy(update={"steps": 11})})
    result = pretrain(longer)
    assert read_starts(job.run) == [0, 3, 8]  # continued, did not restart
    assert result.metrics["step"] == 11


def test_checkpoint_contract_and_tensorboard(ray_session, medulla_raw, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    job = _job(tmp_path, "contract", steps=3)
    job.data.image = medulla_raw
    result = pretrain(job)
    checkpoint = load_model_checkpoint(result.checkpoint.path)
    assert checkpoint["kind"] == "mae" and checkpoint["encoder_prefix"] == "encoder."
    assert PretrainJob.model_validate_json(checkpoint["job"]) == job
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
