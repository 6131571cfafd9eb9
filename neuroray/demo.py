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
from typing import Any

import numpy as np

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

    connect(run.address)
    pool = ServerPool(
        {"image": run.urls["em_raw"], "labels": run.urls["em_labels"]}, num_servers=2, cache_mb=64
    )
    try:
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
    finally:
        pool.shutdown()
    run.urls["served_crops_png"] = str(path)
    served = sum(s["crops"] for s in stats)
    return f"{served} crops from 2 chunk servers (augmented) -> {path}"


STAGES: list[tuple[str, Stage]] = [
    ("synthesise", stage_synthesise),
    ("ingest", stage_ingest),
    ("serve", stage_serve),
]


def run_demo(out: str | Path = "demo_out", address: str | None = None) -> DemoRun:
    run = DemoRun(out=Path(out).resolve(), address=address)
    run.out.mkdir(parents=True, exist_ok=True)
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
