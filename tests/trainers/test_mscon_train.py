"""End to end on EM: MS-Con pretraining on Ray Train from the FIB-SEM cube (a synthetic cube
without ../shared) served by the chunk servers; the loss falls, a worker failure resumes from the last checkpoint, TensorBoard gets
the views and reconstructions, and the checkpoint initialises a UNETR for fine-tuning."""

from __future__ import annotations

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from neuroray.config import validate
from neuroray.models.checkpoint import load_model_checkpoint
from neuroray.models.mscon import ENCODER_PREFIX
from neuroray.models.unetr import UNETRConfig, build_unetr, load_encoder
from neuroray.trainers.loop import read_starts
from neuroray.trainers.mscon import MSConJob, run_mscon

CROP = [16, 64, 64]


def test_mscon_pretraining_on_em_learns_resumes_and_initialises_a_unetr(
    ray_session, em_raw, tmp_path
):
    job = validate(
        MSConJob,
        {
            "data": {
                "image": em_raw.raw,  # served straight from HDF5
                "num_servers": 1,
                "cache_mb": 64,
                "sampler": {"crop_shape": CROP, "roi": [0, 0, 0, 64, 128, 128]},
            },
            "model": {
                "encoder": {"size": None, "width": 32, "depth": 2, "heads": 2, "img_size": CROP},
                "feature_size": 4,
                "pool_grid": [4, 8, 8],
                "token_dim": 32,
                "attention_heads": 2,
            },
            "optim": {"lr": 2e-3, "warmup_steps": 3},
            "run": {
                "name": "mscon_e2e",
                "storage_path": str(tmp_path / "runs"),
                "steps": 24,
                "batch_size": 2,
                "steps_per_epoch": 50,
                "checkpoint_every": 8,
                "report_every": 8,
                "preview_every": 24,
                "keep_checkpoints": 3,
                "fail_at_step": 12,
                "max_failures": 1,
            },
        },
    )
    result = run_mscon(job)

    # one injected failure at step 12: the run restarted from its step-8 checkpoint and finished
    assert read_starts(job.run) == [0, 8]
    windows = sorted((m["step"], m) for _, m in result.best_checkpoints)
    assert [step for step, _ in windows] == [8, 16, 24]
    first, last = windows[0][1], windows[-1][1]
    assert last["loss"] < first["loss"]  # each is the mean over its 8 steps
    assert last["loss_recon"] < first["loss_recon"]
    for key in ("loss_contrast", "loss_cross_weak", "loss_cross_strong", "contrast_accuracy"):
        assert key in last

    # TensorBoard: scalars and the clean | weak | strong | recon | recon preview
    events = EventAccumulator(str(job.run.tensorboard_path()), size_guidance={"images": 0})
    events.Reload()
    assert "train/loss_contrast" in events.Tags()["scalars"]
    (image,) = [t for t in events.Tags()["images"] if t.startswith("pretrain/")]
    preview = events.Images(image)[-1]
    assert preview.step == 24 and preview.width > 4 * CROP[2]  # five tiles side by side

    # the checkpoint initialises a fine-tuning UNETR (skips on, 3 affinity channels)
    checkpoint = load_model_checkpoint(result.checkpoint.path)
    assert checkpoint["kind"] == "mscon" and checkpoint["step"] == 24
    assert checkpoint["encoder_prefix"] == ENCODER_PREFIX
    unetr = build_unetr(UNETRConfig(encoder=job.model.encoder, out_channels=3))
    report = load_encoder(unetr, checkpoint["state_dict"], prefix=checkpoint["encoder_prefix"])
    assert report.loaded and report.missing == [] and report.unexpected == []
    for key in report.loaded:
        assert torch.equal(
            unetr.encoder.state_dict()[key], checkpoint["state_dict"][ENCODER_PREFIX + key]
        )
