"""Per-node and per-block costs on simulated multi-node clusters: the inputs of docs/SCALE.md.

    .venv/bin/python benchmarks/scale.py [--nodes 1 2 4] [--blocks 10000 30000]
                                         [--out benchmarks/results/scale.json]

Every cluster here is a :class:`neuroray.simcluster.LocalCluster`: real raylets on this host,
typed by ``cluster/aws.yaml`` (one logical CPU per node). **On a 2-core machine N nodes share the
same two cores, so the 1 / 2 / 4-node rows measure what each added node costs (more processes,
objects crossing node object stores), not a speed-up.**

1. **ServerPool crops/s** on N chunk-server nodes, one server per node (each server asks for a
   whole node's ``chunk_server`` resource, so they cannot pack): 32×160×160 uint8 image crops
   plus their uint64 labels, batches of 16, 4 in flight, consumed in the driver on the head (so
   every block crosses from a chunk-server node's object store to the head's), servers
   preloaded; beside a numpy slice + copy of the same crops in the driver (the ceiling).
2. **Blockwise segmentation voxels/s** on N worker nodes (``gpu_train``; agglomerate + stitch
   + relabel of a given affinities layer, no network: see RESULTS.md for prediction costs),
   with each stage's seconds, so the driver-side stitch is visible.
3. **Driver bookkeeping per block**: planning ``--blocks`` blocks, checking their completion
   markers, and running one blockwise stage of no-op block tasks (each writes its marker, as a
   real block does) through ``blockwise._run_stage`` — the same submit / track / fail-collect
   loop ``segment`` uses — on one worker node; the driver's CPU seconds and memory per block
   (RSS sampled every 50 ms), and the marker files written; at each ``--blocks`` count, so the
   growth of the per-block cost with the number of blocks is measured, not assumed.
4. **Inference FLOPs per voxel** of UNETR (torch's count of one forward) for the CPU-sized
   config and a ViT-B one, and the network passes per voxel that blockwise prediction's
   window overlap and context margin cost at a 128×1024×1024 block.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILE = REPO / "cluster" / "aws.yaml"
CROP = (32, 160, 160)


# ---------------------------------------------------------------------- inputs
def em_layers(root: Path, shape: tuple[int, int, int]) -> dict[str, str]:
    from neuroray.platform.synthetic import synth_em
    from neuroray.platform.volume import create_volume

    em = synth_em(shape=shape, seed=0, voxel_size=(10.0, 10.0, 10.0))
    layers = {}
    for name, array, kind in (("image", em.raw, "image"), ("labels", em.labels, "segmentation")):
        url = str(root / name)
        layer = create_volume(url, shape=shape, dtype=array.dtype, chunk_shape=(64, 64, 64),
                              layer_type=kind, format="precomputed")  # fmt: skip
        layer.write(layer.bounds, array)
        layers[name] = url
    return layers


def affinity_layer(root: Path, shape: tuple[int, int, int]) -> str:
    from neuroray.platform.synthetic import synth_em
    from neuroray.platform.volume import create_volume
    from neuroray.segmentation.targets import seg_to_affinities

    labels = synth_em(shape=shape, seed=1, voxel_size=(10.0, 10.0, 10.0)).labels
    affs, _ = seg_to_affinities(labels)
    noisy = np.clip(affs + np.random.default_rng(0).normal(0, 0.15, affs.shape), 0, 1)
    url = str(root / "affinities")
    layer = create_volume(url, shape=shape, dtype="uint8", num_channels=3,
                          chunk_shape=(32, 64, 64), format="precomputed")  # fmt: skip
    layer.write(layer.bounds, np.rint(noisy * 255).astype(np.uint8))
    return url


def random_boxes(shape, n, seed=0):
    from neuroray.platform.box import Box

    rng = np.random.default_rng(seed)
    return [
        Box.from_shape(CROP, [rng.integers(0, s - c + 1) for s, c in zip(shape, CROP, strict=True)])
        for _ in range(n)
    ]


class RssSampler:
    """Peak resident memory of this process, sampled every 50 ms on a thread."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


# ---------------------------------------------------------------------- 1. ServerPool
def bench_pool(nodes: int, layers: dict[str, str], shape, crops: int) -> dict:
    import ray

    from neuroray.platform.server import ServerPool
    from neuroray.simcluster import LocalCluster

    with LocalCluster(CLUSTER_FILE, object_store_mb=200) as cluster:
        chunk_type = cluster.spec.with_resource("chunk_server")[0]
        for _ in range(nodes):
            cluster.add(chunk_type.name)
        whole_node = {"chunk_server": chunk_type.resources["chunk_server"]}
        pool = ServerPool(layers, num_servers=nodes, cache_mb=150, preload=True,
                          resources=whole_node, client_cache_mb=256)  # fmt: skip
        try:
            boxes = random_boxes(shape, crops + 160, seed=nodes)
            batches = [boxes[i : i + 16] for i in range(0, len(boxes), 16)]
            for _ in pool.stream(batches[:10], max_in_flight=4):  # warm: map every block once
                pass
            t0 = time.perf_counter()
            served = 0
            for out in pool.stream(batches[10:], max_in_flight=4):
                served += len(out["image"])
            seconds = time.perf_counter() - t0
            placed = {
                ray.get(s.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
                for s in pool.servers
            }
        finally:
            pool.shutdown()
    return {
        "nodes": nodes,
        "servers": nodes,
        "server_nodes": len(placed),
        "crops": served,
        "seconds": round(seconds, 2),
        "crops_per_s": round(served / seconds, 1),
    }


def bench_numpy(layers: dict[str, str], shape, crops: int) -> float:
    from neuroray.platform.volume import open_volume

    arrays = {n: open_volume(u)[:] for n, u in layers.items()}
    boxes = random_boxes(shape, crops, seed=99)
    t0 = time.perf_counter()
    for box in boxes:
        for array in arrays.values():
            np.ascontiguousarray(array[box.slices])
    return len(boxes) / (time.perf_counter() - t0)


def bench_decode(layers: dict[str, str]) -> dict:
    """What one server process decodes from storage: MB/s of decoded 64x256x256 serving blocks
    (precomputed raw+gzip image, compressed_segmentation labels, 64^3 storage chunks)."""
    from neuroray.platform.box import chunk_grid
    from neuroray.platform.server import serving_blocks
    from neuroray.platform.volume import open_volume

    out = {}
    for name, url in layers.items():
        volume = open_volume(url)
        blocks = list(chunk_grid(volume.bounds, serving_blocks(volume.chunk_shape, volume.shape)))
        t0 = time.perf_counter()
        nbytes = sum(volume.read(box).nbytes for box in blocks)
        seconds = time.perf_counter() - t0
        out[name] = {"blocks": len(blocks), "mb_per_s": round(nbytes / 2**20 / seconds, 1),
                     "ms_per_block": round(seconds / len(blocks) * 1e3, 1)}  # fmt: skip
    return out


# ---------------------------------------------------------------------- 2. blockwise
def bench_blockwise(nodes: int, affinities: str, root: Path, block) -> dict:
    from neuroray.segmentation.blockwise import SegmentJob, segment
    from neuroray.simcluster import LocalCluster

    with LocalCluster(CLUSTER_FILE) as cluster:
        worker_type = cluster.spec.with_resource("GPU")[0]
        for _ in range(nodes):
            cluster.add(worker_type.name)
        t0 = time.perf_counter()
        result = segment(
            SegmentJob(affinities=affinities, output=str(root / f"seg{nodes}"), block_shape=block),
            progress=False,
        )
        seconds = time.perf_counter() - t0
    return {
        "nodes": nodes,
        "worker_type": worker_type.name,
        "blocks": result.stages[0].done,
        "voxels": result.voxels,
        "seconds": round(seconds, 2),
        "voxels_per_s": round(result.voxels / seconds),
        "stages_s": {s.stage: round(s.seconds, 2) for s in result.stages},
    }


# ---------------------------------------------------------------------- 3. driver bookkeeping
def noop_block(output: str, index: int) -> int:
    """A block that does nothing but what every block does at its end: write its marker."""
    from neuroray.segmentation.block_output import Markers

    Markers(output).mark("noop", index)
    return index


def bench_bookkeeping(count: int, root: Path) -> dict:
    import psutil
    import ray

    from neuroray.platform.box import Box
    from neuroray.segmentation.block_output import Markers
    from neuroray.segmentation.blockwise import _blocks, _run_stage
    from neuroray.simcluster import LocalCluster

    side = int(round(count ** (1 / 3)))
    grid = (count // (side * side), side, side)  # about `count` blocks of 32 x 128 x 128
    block = (32, 128, 128)
    bounds = Box((0, 0, 0), tuple(g * b for g, b in zip(grid, block, strict=True)))
    process = psutil.Process()
    output = str(root / "noop")
    markers = Markers(output)

    t0 = time.perf_counter()
    blocks = _blocks(bounds, block)
    plan_s = time.perf_counter() - t0
    n = len(blocks)
    t0 = time.perf_counter()
    todo = [i for i in range(n) if not markers.done("noop", i)]
    check_empty_s = time.perf_counter() - t0
    assert len(todo) == n

    with LocalCluster(CLUSTER_FILE, cpus_per_node=2) as cluster:
        cluster.add(cluster.spec.with_resource("GPU")[0].name)
        remote = ray.remote(noop_block).options(num_cpus=0.25, max_retries=0)
        ray.get(remote.remote(output, -1))  # workers started before timing
        cpu0 = process.cpu_times()
        with RssSampler() as rss:
            t0 = time.perf_counter()
            report = _run_stage(
                "noop", blocks, markers, lambda i, b: remote.remote(output, i), progress=False
            )
            run_s = time.perf_counter() - t0
        cpu1 = process.cpu_times()
    driver_cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    t0 = time.perf_counter()
    todo = [i for i in range(n) if not markers.done("noop", i)]
    check_done_s = time.perf_counter() - t0
    marker_files = sum(1 for _ in (markers.root / "noop").glob("*.json"))
    return {
        "blocks": n,
        "done": report.done,
        "left_after_rerun_check": len(todo),
        "plan_us_per_block": round(plan_s / n * 1e6, 2),
        "marker_check_us_per_block_absent": round(check_empty_s / n * 1e6, 2),
        "marker_check_us_per_block_present": round(check_done_s / n * 1e6, 2),
        "stage_wall_us_per_block": round(run_s / n * 1e6, 1),
        "driver_cpu_us_per_block": round(driver_cpu / n * 1e6, 1),
        "blocks_per_s": round(n / run_s, 1),
        "driver_rss_mb_before": round(rss.start / 2**20, 1),
        "driver_rss_mb_peak": round(rss.peak / 2**20, 1),
        "driver_bytes_per_block": round((rss.peak - rss.start) / n),
        "marker_files": marker_files,
    }


def growth(rows: list[dict]) -> dict:
    """How the driver's per-block CPU grows with the block count between the smallest and the
    largest run: cost per block ~ blocks ** exponent (0: constant per block, 1: quadratic total)."""
    import math

    if len(rows) < 2:
        return {}
    a, b = rows[0], rows[-1]
    exponent = math.log(b["driver_cpu_us_per_block"] / a["driver_cpu_us_per_block"]) / math.log(
        b["blocks"] / a["blocks"]
    )
    return {"driver_cpu_per_block_exponent": round(exponent, 2)}


# ---------------------------------------------------------------------- 4. inference FLOPs
def bench_inference_flops(block=(128, 1024, 1024)) -> dict:
    """Forward FLOPs per output voxel of UNETR (torch's own count, one window), and how many
    times blockwise prediction runs the network over each voxel: windows overlap by a quarter
    per axis and each block reads a context margin of a quarter window (blockwise defaults)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from neuroray.models.unetr import UNETRConfig, build_unetr
    from neuroray.models.vit3d import ViTConfig
    from neuroray.segmentation.inference import window_starts

    rows = {}
    for name, (width, depth, heads, window) in {
        "configs/finetune_em.yaml (192 wide, 6 deep)": (192, 6, 3, (16, 64, 64)),
        "ViT-B UNETR (768 wide, 12 deep)": (768, 12, 12, (32, 160, 160)),
    }.items():
        encoder = ViTConfig(size=None, width=width, depth=depth, heads=heads,
                            patch_size=(4, 16, 16), img_size=window, pos_embed="learned")  # fmt: skip
        model = build_unetr(UNETRConfig(encoder=encoder, out_channels=3)).eval()
        x = torch.zeros(1, 1, *window)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        t0 = time.perf_counter()
        with torch.no_grad():
            model(x)
        cpu_s = time.perf_counter() - t0
        voxels = int(np.prod(window))
        context = [w // 4 for w in window]
        region = [b + 2 * c for b, c in zip(block, context, strict=True)]
        stride = [w - w // 4 for w in window]
        passes = np.prod(
            [len(window_starts(r, w, st)) * w / b
             for r, w, st, b in zip(region, window, stride, block, strict=True)]
        )  # fmt: skip
        rows[name] = {
            "window": list(window),
            "gflop_per_window": round(counter.get_total_flops() / 1e9, 2),
            "flop_per_voxel": round(counter.get_total_flops() / voxels),
            "cpu_forward_voxels_per_s": round(voxels / cpu_s),
            "block": list(block),
            "network_passes_per_voxel": round(float(passes), 2),
        }
    return rows


# ---------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--crops", type=int, default=3200)
    parser.add_argument("--blocks", type=int, nargs="+", default=[10_000, 30_000])
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["pool", "blockwise", "driver", "flops"]
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scale.json"))
    args = parser.parse_args()

    started = time.time()
    result: dict = {
        "command": "benchmarks/scale.py "
        + " ".join(
            [
                f"--nodes {' '.join(map(str, args.nodes))}",
                f"--crops {args.crops}",
                f"--blocks {' '.join(map(str, args.blocks))}",
            ]
        ),  # fmt: skip
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_1min_at_start": round(os.getloadavg()[0], 2),
        },  # fmt: skip
        "note": "simulated nodes share this host's cores: rows show per-node overhead, not speed-up",
    }
    with tempfile.TemporaryDirectory(prefix="nr-scale-") as tmp:
        root = Path(tmp)
        if "pool" not in args.skip:
            shape = (64, 512, 512)
            layers = em_layers(root / "em", shape)
            ceiling = bench_numpy(layers, shape, args.crops)
            rows = []
            for n in args.nodes:
                rows.append(bench_pool(n, layers, shape, args.crops))
                print("pool", rows[-1], flush=True)
            decode = bench_decode(layers)
            result["server_pool"] = {
                "decode_one_process": decode,
                "crop": list(CROP), "layers": ["image uint8", "labels uint64"],
                "batch": 16, "in_flight": 4, "numpy_ceiling_crops_per_s": round(ceiling, 1),
                "rows": rows,
            }  # fmt: skip
        if "blockwise" not in args.skip:
            shape, block = (64, 256, 256), (32, 64, 64)
            affinities = affinity_layer(root / "affs", shape)
            rows = []
            for n in args.nodes:
                rows.append(bench_blockwise(n, affinities, root, block))
                print("blockwise", rows[-1], flush=True)
            result["blockwise"] = {"shape": list(shape), "block": list(block), "rows": rows}
        if "driver" not in args.skip:
            rows = []
            for count in args.blocks:
                rows.append(bench_bookkeeping(count, root / f"noop{count}"))
                print("driver", rows[-1], flush=True)
            result["driver_bookkeeping"] = {"rows": rows, **growth(rows)}
    if "flops" not in args.skip:
        result["inference_flops"] = bench_inference_flops()
        print("flops", result["inference_flops"], flush=True)
    result["load_1min_at_end"] = round(os.getloadavg()[0], 2)
    result["seconds"] = round(time.time() - started)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
