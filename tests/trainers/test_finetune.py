"""Fine-tuning on Ray Train, then blockwise segmentation and evaluation of the result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from neuroray.cli import main
from neuroray.config import validate
from neuroray.errors import ConfigError
from neuroray.models.checkpoint import load_model_checkpoint
from neuroray.platform.ingest import ingest
from neuroray.platform.volume import create_volume, open_volume
from neuroray.segmentation.tasks import binary_targets, em_targets
from neuroray.trainers.finetune import FinetuneJob, finetune

TINY_ENCODER = {"size": None, "width": 48, "depth": 2, "heads": 2, "img_size": [16, 64, 64],
                "pos_embed": "learned"}


def _job(tmp_path, task, image, labels, roi, val_roi, steps=12, **extra):
    return validate(FinetuneJob, {
        "task": task,
        "data": {"image": image, "labels": labels, "num_servers": 1, "cache_mb": 64,
                 "sampler": {"crop_shape": [16, 64, 64], "roi": roi}, "augment": "em"},
        "model": {"encoder": TINY_ENCODER, "feature_size": 8, **extra},
        "validation": {"roi": val_roi, "thresholds": [0.3, 0.5, 0.7]},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "run": {"name": f"ft_{task}", "storage_path": str(tmp_path / "runs"), "steps": steps,
                "batch_size": 2, "checkpoint_every": steps, "report_every": 6},
    })


@pytest.fixture(scope="module")
def gala_layers(em_volume, tmp_path_factory):
    """fib_gala_train (or synthetic EM of its shape) ingested as precomputed layers."""
    root = tmp_path_factory.mktemp("gala_ft")
    urls = {}
    for name in ("raw", "labels"):
        urls[name] = str(root / name)
        ingest(getattr(em_volume, name), urls[name], chunk_shape=(25, 50, 100), progress=False)
    return urls


def test_targets_have_the_documented_shapes(em_volume):
    from neuroray.segmentation.tasks import TargetSettings

    labels = open_volume(em_volume.labels)[:16, :64, :64]
    affs, weights = em_targets(labels, TargetSettings())
    assert affs.shape == weights.shape == (3, 16, 64, 64)
    assert set(np.unique(affs)) <= {0.0, 1.0}
    assert (weights[0, 0] == 0).all()  # the first z slice has no z neighbour
    assert (weights[1, :, 0] == 0).all() and (weights[2, :, :, 0] == 0).all()
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    common = labels == ids[np.argmax(counts)]
    assert common.mean() > 0.05
    target, w = binary_targets(common, balance=True)
    positive = target[0] > 0
    assert w[0][positive].sum() == pytest.approx(w[0][~positive].sum(), rel=1e-3)
    rare = labels == ids[np.argmin(counts)]  # far under 5% of the crop
    if not em_volume.real:  # the synthetic crop holds a few large neurites: take a sliver
        rare = np.zeros_like(common)
        rare[0, :8, :8] = True
    target, w = binary_targets(rare, balance=True)
    assert w[0][target[0] > 0].max() == pytest.approx(10.0)  # capped, not 0.5 / fraction


def test_em_finetune_segment_evaluate_from_the_users_folder(
    ray_session, gala_layers, tmp_path, monkeypatch, capsys
):
    """The README's workflow as a user types it: relative paths, run from their own folder.
    Train, Tune and task workers run in other directories, so every path must have been made
    absolute before the job left the driver: the run, its TensorBoard events and its restart
    log land in ./runs/<name>, and segment / evaluate read and write where the user is."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "layers").symlink_to(Path(gala_layers["raw"]).parent)
    job = _job(tmp_path, "em", "layers/raw", "layers/labels",
               roi=[0, 0, 0, 34, 100, 200], val_roi=[34, 0, 0, 50, 100, 200])
    data = job.model_dump(mode="json")
    data["data"].update(image="layers/raw", labels="layers/labels")
    data["run"]["storage_path"] = "runs"
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))
    assert main(["finetune", "em", "job.yaml"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index('{\n  "checkpoint"'):])
    metrics = report["metrics"]
    assert metrics["step"] == 12
    for key in ("val_voi", "val_voi_split", "val_voi_merge", "val_arand", "val_threshold"):
        assert np.isfinite(metrics[key]), key
    run_dir = tmp_path / "runs" / "ft_em"
    assert Path(report["checkpoint"]).parent == run_dir
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "starts.jsonl").is_file()
    checkpoint = load_model_checkpoint("runs/ft_em")
    assert checkpoint["kind"] == "finetune_em"
    assert any(k.startswith("encoder.blocks.") for k in checkpoint["state_dict"])

    assert main(["segment", "checkpoint=runs/ft_em", "image=layers/raw", "output=seg",
                 "block_shape=[25,50,100]", "threshold=0.5"]) == 0
    assert "predict: 8 blocks" in capsys.readouterr().out
    affs = open_volume("seg/affinities")
    assert affs.num_channels == 3 and affs.shape == (50, 100, 200)
    assert open_volume("seg/segmentation")[:].max() > 1

    assert main(["evaluate", "seg/segmentation", "layers/labels", "--image", "layers/raw",
                 "--out", "eval"]) == 0
    scores = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert scores["voi"] > 0 and 0 <= scores["arand"] <= 1
    assert (tmp_path / "eval" / "preview.png").stat().st_size > 1000


def test_mito_finetune_reports_dice(ray_session, mito_volume, tmp_path):
    urls = {}
    for name, source in (("raw", mito_volume.raw), ("mitochondria", mito_volume.labels)):
        data = open_volume(source)[mito_volume.region]
        assert data.shape == (20, 192, 192)
        url = f"{tmp_path}/mito.h5#{name}"
        create_volume(url, shape=data.shape, dtype=data.dtype, chunk_shape=(4, 64, 64),
                      voxel_size=(50, 4.6, 4.6)).write(open_volume(url).bounds, data)
        urls[name] = url
    job = _job(tmp_path, "mito", urls["raw"], urls["mitochondria"],
               roi=[0, 0, 0, 16, 192, 192], val_roi=[16, 0, 0, 20, 192, 192], steps=8)
    metrics = finetune(job).metrics
    assert 0.0 <= metrics["val_dice"] <= 1.0 and 0.0 <= metrics["val_iou"] <= 1.0


def test_a_unet_trains_to_a_time_budget_and_its_chosen_threshold_travels_to_segment(
    ray_session, gala_layers, tmp_path
):
    """``model.name=unet`` in the same job; ``run.time_budget_s`` ends training at a checkpoint
    long before ``run.steps``; the threshold validation chose is in the checkpoint, and
    ``segment`` uses it when not told otherwise."""
    from neuroray.segmentation.blockwise import SegmentJob, segment

    job = _job(tmp_path, "em", gala_layers["raw"], gala_layers["labels"],
               roi=[0, 0, 0, 34, 100, 200], val_roi=[34, 0, 0, 50, 100, 200], steps=10_000)
    data = job.model_dump(mode="json")
    data["model"] = {"name": "unet", "unet": {"channels": [4, 8, 16]}}
    data["run"].update(time_budget_s=4.0, checkpoint_every=10_000, name="ft_unet")
    job = validate(FinetuneJob, data)
    assert job.model.window == (16, 64, 64)  # filled from the crop
    metrics = finetune(job).metrics
    assert 1 <= metrics["step"] < 10_000 and metrics["trained_s"] >= 4.0
    checkpoint = load_model_checkpoint(tmp_path / "runs" / "ft_unet")
    assert checkpoint["postprocess"] == {"threshold": metrics["val_threshold"]}
    assert not any(k.startswith("encoder.") for k in checkpoint["state_dict"])

    result = segment(SegmentJob(checkpoint=str(tmp_path / "runs" / "ft_unet"),
                                image=gala_layers["raw"], output=str(tmp_path / "seg"),
                                roi=[0, 0, 0, 25, 50, 100], block_shape=[25, 50, 100]),
                     progress=False)
    assert result.threshold == metrics["val_threshold"]
    assert open_volume(result.layers["segmentation"])[:25, :50, :100].max() >= 1


def test_finetune_config_errors(gala_layers):
    with pytest.raises(ConfigError, match="needs data.labels"):
        validate(FinetuneJob, {"data": {"image": gala_layers["raw"]}})
    with pytest.raises(ConfigError, match="must equal model.unet.window"):
        validate(FinetuneJob, {"data": {"image": "a", "labels": "b"},
                               "model": {"name": "unet", "unet": {"window": [8, 32, 32]}}})
    with pytest.raises(ConfigError, match="model.init"):
        validate(FinetuneJob, {"data": {"image": "a", "labels": "b",
                                        "sampler": {"crop_shape": [32, 160, 160]}},
                               "model": {"init": "imagenet"}})
