"""``neuroray demo``: the whole pipeline on synthetic data with an embedded Ray.

Stages run in order and each adds what the platform can do: synthesise → ingest → serve →
(pretrain → fine-tune → segment → evaluate as they land). Everything is written under one output
folder, and the run ends with a table of what each stage wrote and how long it took. The demo is
sized to finish in well under 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:
    from pydantic import BaseModel

M = TypeVar("M", bound="BaseModel")

DEMO_EM_SHAPE = (48, 192, 192)
DEMO_LM_SHAPE = (48, 160, 160)


@dataclass
class DemoRun:
    """What the stages share: the output folder, the URLs they wrote, and what they measured."""

    out: Path
    address: str | None = None
    urls: dict[str, str] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    rows: list[tuple[str, float, str]] = field(default_factory=list)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per training stage: the shipped config it loaded and every override it applied."""

    def say(self, message: str) -> None:
        print(f"[demo] {message}", flush=True)


Stage = Callable[[DemoRun], str]


def stage_synthesise(run: DemoRun) -> str:
    from neuroray.platform.synthetic import write_synthetic

    em = write_synthetic("em", run.out / "sources", shape=DEMO_EM_SHAPE, seed=0)
    lm = write_synthetic("lm", run.out / "sources", shape=DEMO_LM_SHAPE, seed=0)
    run.urls.update({f"em_{k}_source": v for k, v in em.items()})
    run.urls.update({f"lm_{k}_source": v for k, v in lm.items()})
    return f"EM {DEMO_EM_SHAPE} + LM {DEMO_LM_SHAPE} in {run.out / 'sources'}"


def stage_ingest(run: DemoRun) -> str:
    from neuroray.platform.ingest import ingest
    from neuroray.platform.volume import open_volume

    layers = run.out / "layers"
    jobs = [
        ("em_raw", run.urls["em_raw_source"], layers / "em" / "raw", False),
        ("em_labels", run.urls["em_labels_source"], layers / "em" / "labels", True),
        ("em_mito", run.urls["em_mito_source"], layers / "em" / "mito", True),
        ("lm_image", run.urls["lm_image_source"], layers / "lm" / "image.zarr", False),
    ]
    for name, src, dst, labels in jobs:
        result = ingest(src, str(dst), chunk_shape=(16, 64, 64), labels=labels, progress=False)
        run.urls[name] = str(dst)
        volume = open_volume(dst)
        run.say(
            f"{name}: {volume.format_name} {volume.shape} {volume.dtype.name} "
            f"voxel {volume.voxel_size} nm -> {dst} ({result.chunks_written} chunks)"
        )
    return f"precomputed + zarr layers with Parquet manifests in {layers}"


def stage_serve(run: DemoRun) -> str:
    from neuroray.platform.augment import build_pipeline
    from neuroray.platform.ingest import read_manifest
    from neuroray.platform.sampler import CropDataset, CropSampler
    from neuroray.platform.server import ServerPool
    from neuroray.preview import grid, overlay, save_png
    from neuroray.runtime import connect

    connect(run.address, log_to_driver=False)
    with ServerPool(
        {"image": run.urls["em_raw"], "labels": run.urls["em_labels"]}, num_servers=2, cache_mb=64
    ) as pool:
        sampler = CropSampler(
            pool.bounds,
            (16, 96, 96),
            seed=0,
            min_foreground=0.5,
            manifest=read_manifest(run.urls["em_labels"]),
        )
        dataset = CropDataset(pool, sampler, samples_per_epoch=6, augment=build_pipeline("em"))
        tiles = []
        for sample in dataset:
            image, labels = sample["image"][0].numpy(), sample["labels"].numpy()
            tiles.append(overlay(image[image.shape[0] // 2], labels[labels.shape[0] // 2]))
        path = save_png(grid(tiles, columns=3), run.out / "previews" / "served_crops.png")
        stats = pool.server_stats()
    run.urls["served_crops_png"] = str(path)
    blocks = sum(s["reads"] for s in stats)
    return (
        f"{pool.stats_.crops} crops assembled from {blocks} blocks decoded once by 2 chunk "
        f"servers (augmented) -> {path}"
    )


TRAIN_ROI = [0, 0, 0, 34, 192, 192]  # fine-tuning crops come from z < 34
VALID_ROI = [34, 0, 0, 48, 192, 192]  # threshold chosen here; segmentation scored here too

# The training stages run the configs users run (neuroray/configs/*.yaml, `configs/` in a
# checkout) with these overrides; the layers the demo wrote and its output folder are set on top
# (see load_job). Everything else (patch 4x16x16, 3 heads, 16x64x64 crops, augmentations, targets,
# losses, thresholds, the RL side) is the shipped config's.
#: The shipped ViT at half the width and two thirds of the depth, so every stage fits 2 cores.
DEMO_ENCODER = ["model.encoder.width=96", "model.encoder.depth=4"]
#: Minutes, not hours: short runs, small chunk caches, 50-step epochs, one checkpoint at the end.
PRETRAIN_OVERRIDES = [
    *DEMO_ENCODER,
    "model.decoder_width=64",
    "data.cache_mb=64",
    "optim.warmup_steps=10",
    "run.name=demo_pretrain_dbmim",
    "run.steps=60",
    "run.batch_size=4",
    "run.steps_per_epoch=50",
    "run.checkpoint_every=60",
    "run.preview_every=60",
    "rl.ppo.train_batch_agent_steps=512",
    "rl.ppo.minibatch_size=256",
    "rl.ppo.num_epochs=2",
    "rl.checkpoint_every=5",
]
FINETUNE_EM_OVERRIDES = [
    *DEMO_ENCODER,
    "data.cache_mb=64",
    f"data.sampler.roi={TRAIN_ROI}",
    f"validation.roi={VALID_ROI}",
    "optim.lr=0.001",
    "optim.layer_decay=null",
    "optim.warmup_steps=10",
    "run.name=demo_finetune_em",
    "run.steps=150",
    "run.steps_per_epoch=50",
    "run.checkpoint_every=150",
    "run.report_every=25",
    "run.preview_every=75",
]
FINETUNE_LM_OVERRIDES = [
    *DEMO_ENCODER,
    "model.encoder.img_size=[16, 64, 64]",
    "data.sampler.crop_shape=[16, 64, 64]",
    "data.augment=[]",  # a 150-step demo learns more from clean crops
    "data.num_servers=1",
    "data.cache_mb=64",
    "data.sampler.roi=[0, 0, 0, 32, 160, 160]",  # the synthetic LM volume: z < 32 trains
    "validation.roi=[32, 0, 0, 48, 160, 160]",
    "model.freeze_encoder_steps=0",
    "optim.lr=0.001",
    "optim.layer_decay=null",
    "optim.warmup_steps=10",
    "run.name=demo_finetune_lm",
    "run.steps=150",
    "run.steps_per_epoch=50",
    "run.checkpoint_every=150",
    "run.preview_every=50",
]


def load_job(
    run: DemoRun,
    stage: str,
    model: type[M],
    config: str,
    overrides: list[str],
    values: dict[str, Any],
) -> M:
    """Shipped config ``config`` with ``overrides``, then ``values`` (the demo's own layers and
    checkpoints, by dotted key) and its output folder; recorded in ``run.jobs[stage]``."""
    from neuroray import configs
    from neuroray.config import override

    every = [
        *overrides,
        *(override(key, value) for key, value in values.items()),
        override("run.storage_path", str(run.out / "runs")),
    ]
    run.jobs[stage] = {"config": f"configs/{config}.yaml", "overrides": every}
    return configs.load(model, config, every)


def stage_pretrain(run: DemoRun) -> str:
    """dbMiM: an RLlib masking policy (one agent per patch, shared) beside the MAE on Ray Train."""
    from neuroray.agents.dbmim import DbMiMJob, run_dbmim

    job = load_job(
        run,
        "pretrain",
        DbMiMJob,
        "pretrain_dbmim",
        PRETRAIN_OVERRIDES,
        {"data.image": run.urls["em_raw"]},
    )
    result = run_dbmim(job)
    metrics = result.metrics
    run.urls["pretrain_checkpoint"] = result.checkpoint.path
    run.results["pretrain"] = {
        k: metrics[k]
        for k in ("loss", "mask_ratio", "rl/iterations", "rl/decisions_per_s")
        if k in metrics
    }
    return (
        f"dbMiM: MAE loss {metrics['loss']:.3f} after 60 steps, policy mask ratio "
        f"{metrics['mask_ratio']:.2f}, {metrics.get('rl/iterations', 0)} PPO iterations "
        f"({metrics.get('rl/decisions_per_s', 0):.0f} agent decisions/s) -> {result.checkpoint.path}"
    )


def stage_finetune(run: DemoRun) -> str:
    from neuroray.trainers.finetune import FinetuneJob, finetune

    job = load_job(
        run,
        "finetune",
        FinetuneJob,
        "finetune_em",
        FINETUNE_EM_OVERRIDES,
        {
            "data.image": run.urls["em_raw"],
            "data.labels": run.urls["em_labels"],
            "model.init": f"checkpoint:{run.urls['pretrain_checkpoint']}",
        },
    )
    result = finetune(job)
    metrics = result.metrics
    run.urls["finetune_checkpoint"] = result.checkpoint.path
    run.results["finetune_validation"] = {k: v for k, v in metrics.items() if k.startswith("val_")}
    return (
        f"UNETR affinities, validation VOI {metrics['val_voi']:.3f} (split "
        f"{metrics['val_voi_split']:.3f}, merge {metrics['val_voi_merge']:.3f}), ARAND "
        f"{metrics['val_arand']:.3f} at waterz threshold {metrics['val_threshold']}"
    )


def stage_segment(run: DemoRun) -> str:
    from neuroray.segmentation.blockwise import SegmentJob, segment

    threshold = run.results["finetune_validation"]["val_threshold"]
    result = segment(
        SegmentJob(
            checkpoint=run.urls["finetune_checkpoint"],
            image=run.urls["em_raw"],
            output=str(run.out / "segmentation" / "em"),
            block_shape=(48, 96, 96),
            threshold=threshold,
        ),
        progress=False,
    )
    run.urls.update({f"em_{name}": url for name, url in result.layers.items()})
    seconds = sum(s.seconds for s in result.stages)
    return f"{result.voxels / 1e6:.1f} Mvoxels in {len(result.stages)} stages ({result.voxels / seconds / 1e3:.0f} kvoxels/s) -> {result.output}"


def stage_evaluate(run: DemoRun) -> str:
    from neuroray.segmentation.evaluate import evaluate_layers

    report = evaluate_layers(
        run.urls["em_segmentation"],
        run.urls["em_labels"],
        roi=tuple(VALID_ROI),
        image=run.urls["em_raw"],
        out=str(run.out / "evaluation" / "em"),
    )
    run.results["evaluate_em"] = report.metrics
    run.urls["em_preview_png"] = report.files["preview"]
    m = report.metrics
    return (
        f"held-out slab: VOI split {m['voi_split']:.3f} merge {m['voi_merge']:.3f}, ARAND "
        f"{m['arand']:.3f}, CREMI score {m['cremi_score']:.3f} -> {report.files['preview']}"
    )


def stage_light_microscopy(run: DemoRun) -> str:
    """2D natural-image ViT -> 3D encoder (center inflation) -> LM neuron masks -> Dice."""
    from neuroray.models.pretrain2d import pretrain_2d
    from neuroray.platform.lm_data import prepare_lm_stack
    from neuroray.trainers.finetune import FinetuneJob, finetune

    vit2d = pretrain_2d(
        output=str(run.out / "runs" / "vit2d"),
        steps=60,
        batch_size=16,
        width=96,
        depth=4,
        heads=3,
        progress=False,
    )
    layers = prepare_lm_stack(
        run.urls["lm_image_source"],
        run.urls["lm_swc_source"],
        run.out / "layers" / "lm_train",
        radius_floor_px=1.5,
    )
    job = load_job(
        run,
        "lm",
        FinetuneJob,
        "finetune_lm",
        FINETUNE_LM_OVERRIDES,
        {
            "data.image": layers["image"],
            "data.labels": layers["labels"],
            "model.init": vit2d.source,
        },
    )
    metrics = finetune(job).metrics
    run.results["lm_validation"] = {k: v for k, v in metrics.items() if k.startswith("val_")}
    return (
        f"2D ViT (natural photos, loss {vit2d.losses[-1]:.3f}) inflated to 3D, LM neuron Dice "
        f"{metrics['val_dice']:.3f} / IoU {metrics['val_iou']:.3f} on the held-out slab"
    )


STAGES: list[tuple[str, Stage]] = [
    ("synthesise", stage_synthesise),
    ("ingest", stage_ingest),
    ("serve", stage_serve),
    ("pretrain", stage_pretrain),
    ("finetune", stage_finetune),
    ("segment", stage_segment),
    ("evaluate", stage_evaluate),
    ("lm", stage_light_microscopy),
]


#: Written into the folder the demo creates; ``--fresh`` deletes only folders that carry it.
DEMO_MARKER = ".neuroray-demo"


def prepare_out(out: Path, fresh: bool) -> None:
    """Make ``out`` (marking it as the demo's), emptying it first when ``fresh``.

    ``--fresh`` never deletes a folder the demo did not create: ``--out .`` in a checkout, a home
    directory or a data folder is refused with one line.
    """
    import shutil

    from neuroray.errors import ConfigError

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the demo's outputs")
    empty = not out.exists() or not any(out.iterdir())
    marked = (out / DEMO_MARKER).is_file()
    if fresh and not empty:
        if not marked:
            raise ConfigError(
                f"--fresh would delete {out}, which the demo did not create (no {DEMO_MARKER} "
                "file in it); choose another --out, or delete the folder yourself"
            )
        shutil.rmtree(out)
        empty = True
    out.mkdir(parents=True, exist_ok=True)
    if empty:  # the demo creates (or re-creates) this folder: mark it as its own
        (out / DEMO_MARKER).write_text("made by `neuroray demo`; --fresh may delete this folder\n")


def run_demo(
    out: str | Path = "demo_out", address: str | None = None, fresh: bool = False
) -> DemoRun:
    """Run every stage into ``out``. Rerunning into the same folder resumes (finished chunks,
    checkpoints and blocks are kept); ``fresh`` deletes the folder first, but only a folder the
    demo made itself (it carries :data:`DEMO_MARKER`)."""
    run = DemoRun(out=Path(out).resolve(), address=address)
    prepare_out(run.out, fresh)
    started = time.perf_counter()
    for name, stage in STAGES:
        run.say(f"stage {name} ...")
        t0 = time.perf_counter()
        summary = stage(run)
        run.rows.append((name, time.perf_counter() - t0, summary))
        run.say(f"stage {name} done in {run.rows[-1][1]:.1f} s: {summary}")
    total = time.perf_counter() - started
    (run.out / "demo_summary.json").write_text(
        json.dumps(
            {
                "urls": run.urls,
                "jobs": run.jobs,
                "results": _jsonable(run.results),
                "stages": [
                    {"stage": n, "seconds": round(s, 2), "summary": m} for n, s, m in run.rows
                ],
                "total_seconds": round(total, 1),
            },
            indent=2,
        )
    )
    print()
    print(f"{'stage':<12} {'seconds':>8}  result")
    for name, seconds, summary in run.rows:
        print(f"{name:<12} {seconds:>8.1f}  {summary}")
    print(f"{'total':<12} {total:>8.1f}  everything is under {run.out}")
    return run


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value
