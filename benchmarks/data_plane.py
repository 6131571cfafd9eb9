"""Random training crops per second: ServerPool (1, 2 servers) vs CloudVolume vs numpy, one run.

    .venv/bin/python benchmarks/data_plane.py [--data ../shared/data] [--crops 1500]

Crops are 32×160×160 uint8 from fib_medulla_s2 (250³) ingested as a precomputed layer with 64³
raw+gzip chunks. (a) the ServerPool serves batches of 16 crops with 4 batches in flight (the
training path: each crop ends in the consumer's process); (b) CloudVolume reads each crop
straight from the layer, no cache; (c) numpy slices an in-memory array and copies the crop (the
ceiling). Each server's peak RSS is printed beside its cache budget; the fixed overhead is the
private memory (USS) of an idle ChunkServer process (Python, numpy, CloudVolume, Ray worker);
USS excludes the shared object store pages a server maps, which RSS would count.
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=os.environ.get("NEURORAY_DATA", "../shared/data"))
    parser.add_argument("--crops", type=int, default=1500)
    parser.add_argument("--cache-mb", type=float, default=64)
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


if __name__ == "__main__":
    main()
