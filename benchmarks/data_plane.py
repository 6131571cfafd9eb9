"""Random training crops per second: ServerPool (1, 2 servers) vs CloudVolume vs numpy, one run.

    .venv/bin/python benchmarks/data_plane.py [--data ../shared/data] [--crops 1500]

Crops are 32×160×160 uint8 from fib_medulla_s2 (250³) ingested as a precomputed layer with 64³
raw+gzip chunks. (a) the ServerPool serves batches of 16 crops with 4 batches in flight (the
training path: each crop ends in the consumer's process); (b) CloudVolume reads each crop
straight from the layer, no cache; (c) numpy slices an in-memory array and copies the crop (the
ceiling). Each server's peak RSS is printed beside its cache budget; the fixed overhead is the
private memory (USS) of an idle ChunkServer process (Python, numpy, CloudVolume, Ray worker);
USS excludes the shared object store pages a server maps, which RSS would count.

**LM row** (``--lm``, sparse foreground, rejection on): the shipped ``configs/finetune_lm.yaml``
data settings (its servers, cache, crop shape and ``min_foreground``) on DIADEM OP_1–OP_4, the
training path (``CropDataset``) drawing ``--lm-crops`` accepted crops, once rejecting after the
crop is served (``foreground_from=labels``: every rejected crop still moves its blocks) and once
choosing boxes from the labels manifest before any block moves (``foreground_from=manifest``, the
shipped setting): accepted crops/s, crops served per accepted crop, and the bytes Ray spilled
from the object store to disk during each.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

CROP = (32, 160, 160)


def random_boxes(shape, n, seed=0):
    from neuroray.platform.box import Box

    rng = np.random.default_rng(seed)
    return [
        Box.from_shape(CROP, [rng.integers(0, s - c + 1) for s, c in zip(shape, CROP, strict=True)])
        for _ in range(n)
    ]


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def bench_numpy(array, boxes):
    t0 = time.perf_counter()
    for box in boxes:
        np.ascontiguousarray(array[box.slices])
    return rate(len(boxes), time.perf_counter() - t0)


def bench_cloudvolume(url, boxes):
    from cloudvolume import CloudVolume

    cv = CloudVolume(f"file://{url}", progress=False, cache=False)
    t0 = time.perf_counter()
    for box in boxes:
        z0, y0, x0 = box.start
        z1, y1, x1 = box.stop
        np.asarray(cv[x0:x1, y0:y1, z0:z1])
    return rate(len(boxes), time.perf_counter() - t0)


def bench_pool(url, boxes, num_servers, cache_mb, mode):
    from neuroray.platform.server import ServerPool

    pool = ServerPool(
        {"image": url}, num_servers=num_servers, cache_mb=cache_mb, preload=True, mode=mode
    )
    try:
        batches = [boxes[i : i + 16] for i in range(0, len(boxes), 16)]
        for _ in pool.stream(batches[:4]):  # warm up the call path
            pass
        t0 = time.perf_counter()
        served = 0
        for out in pool.stream(batches, max_in_flight=4):
            served += len(out["image"])
        crops_per_s = rate(served, time.perf_counter() - t0)
        stats = pool.server_stats()
    finally:
        pool.shutdown()
    return crops_per_s, stats


def idle_server_rss(url: str) -> int:
    import ray

    from neuroray.platform.server import ChunkServer

    server = ray.remote(ChunkServer).remote({"image": url}, [], 1)
    rss = ray.get(server.stats.remote())["private_bytes"]
    ray.kill(server)
    return rss


def spilled_bytes() -> int:
    """Bytes this Ray cluster has spilled from the object store to disk so far."""
    import re

    from ray._private.internal_api import memory_summary

    found = re.search(r"Spilled ([0-9.]+) MiB", memory_summary(stats_only=True))
    return round(float(found.group(1)) * 2**20) if found else 0


def bench_lm(data: str, crops: int, tmp: str) -> dict[str, dict[str, float]]:
    """Accepted LM crops/s and spilled bytes, rejection after serving vs from the manifest."""
    from neuroray import configs
    from neuroray.config import override
    from neuroray.platform.ingest import read_manifest
    from neuroray.platform.lm_data import op_pairs, prepare_lm_stacks
    from neuroray.platform.sampler import CropDataset, build_sampler
    from neuroray.trainers.data import start_pool
    from neuroray.trainers.finetune import FinetuneJob

    layers = prepare_lm_stacks(op_pairs(data, [1, 2, 3, 4]), f"{tmp}/lm")
    rows = {}
    for source in ("labels", "manifest"):
        job = configs.load(FinetuneJob, "finetune_lm", [
            override("data.image", layers.image), override("data.labels", layers.labels),
            override("data.sampler.foreground_from", source), "data.sampler.roi=null",
        ])  # fmt: skip
        settings = job.data
        pool = start_pool(settings)
        try:
            manifest = read_manifest(layers.labels) if source == "manifest" else None
            sampler = build_sampler(pool, settings.sampler, manifest)
            served = 0
            accepts = sampler.accepts

            def counting(labels, accepts=accepts):
                nonlocal served
                served += 1
                return accepts(labels)

            sampler.accepts = counting  # type: ignore[method-assign]
            dataset = CropDataset(
                pool, sampler, samples_per_epoch=crops,
                crops_per_request=settings.crops_per_request, prefetch=settings.prefetch,
            )  # fmt: skip
            spilled = spilled_bytes()
            t0 = time.perf_counter()
            accepted = sum(1 for _ in dataset)
            seconds = time.perf_counter() - t0
            rows[f"foreground_from={source}"] = {
                "crops_per_s": rate(accepted, seconds),
                "served_per_accepted": served / max(accepted, 1),
                "spilled_bytes": spilled_bytes() - spilled,
            }
        finally:
            pool.shutdown()
    return rows


def print_lm(rows: dict[str, dict[str, float]], crops: int) -> None:
    print(f"\nLM (configs/finetune_lm.yaml data settings, DIADEM OP_1-4), {crops} accepted crops")
    print("| rejection | accepted crops/s | crops served per accepted | MiB spilled |")
    print("|---|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['crops_per_s']:.1f} | {r['served_per_accepted']:.1f} | "
              f"{r['spilled_bytes'] / 2**20:.0f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=os.environ.get("NEURORAY_DATA", "../shared/data"))
    parser.add_argument("--crops", type=int, default=1500)
    parser.add_argument("--cache-mb", type=float, default=64)
    parser.add_argument("--lm", action="store_true", help="add the sparse LM row (DIADEM OP_1-4)")
    parser.add_argument("--lm-crops", type=int, default=400)
    args = parser.parse_args()

    from neuroray.platform.ingest import ingest
    from neuroray.platform.volume import open_volume
    from neuroray.runtime import connect

    connect(num_cpus=2, object_store_mb=1024, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"{tmp}/raw"
        ingest(
            f"{args.data}/em/fib_medulla_s2.h5#raw", url, chunk_shape=(64, 64, 64), progress=False
        )
        array = open_volume(url)[:]
        boxes = random_boxes(array.shape, args.crops)
        cv_boxes = boxes[: max(100, args.crops // 10)]
        rows = {"numpy slice + copy (ceiling)": bench_numpy(array, boxes)}
        rows["CloudVolume per crop (no cache)"] = bench_cloudvolume(url, cv_boxes)
        memory = {}
        for mode in ("chunks", "crops"):
            for n in (1, 2):
                key = f"ServerPool, {n} server{'s' * (n > 1)}, mode={mode}"
                rows[key], memory[key] = bench_pool(url, boxes, n, args.cache_mb, mode)
        overhead = idle_server_rss(url)
        lm = bench_lm(args.data, args.lm_crops, tmp) if args.lm else {}

    ceiling, direct = rows["numpy slice + copy (ceiling)"], rows["CloudVolume per crop (no cache)"]
    print(
        f"\n{CROP} uint8 crops from a 250^3 precomputed layer (64^3 raw+gzip chunks), {args.crops} crops\n"
    )
    print("| source | crops/s | × CloudVolume | × numpy |")
    print("|---|---:|---:|---:|")
    for name, value in rows.items():
        print(f"| {name} | {value:,.0f} | {value / direct:.1f} | {value / ceiling:.2f} |")
    budget = args.cache_mb * 2**20
    print(
        f"\nidle ChunkServer private memory (fixed overhead): {overhead / 2**20:.0f} MiB; "
        f"cache budget per server {args.cache_mb:.0f} MiB (chunks mode: in the shared object store)"
    )
    print(
        "| pool | server | peak private MiB | over idle | heap cache MiB | shared cache MiB "
        "| within budget + overhead |"
    )
    print("|---|---|---:|---:|---:|---:|---|")
    for key, stats in memory.items():
        for i, s in enumerate(stats):
            peak = s["peak_private_bytes"]
            print(
                f"| {key} | {i} | {peak / 2**20:.0f} | {(peak - overhead) / 2**20:.0f} | "
                f"{s['heap_cached_bytes'] / 2**20:.0f} | {s['shared_cached_bytes'] / 2**20:.0f} | "
                f"{'yes' if peak <= overhead + budget else 'NO'} |"
            )
    if lm:
        print_lm(lm, args.lm_crops)


if __name__ == "__main__":
    main()
