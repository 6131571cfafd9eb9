"""docs/SCALE.md's petavoxel estimate, computed from benchmarks/results/scale.json.

    .venv/bin/python benchmarks/scale_model.py [--results benchmarks/results/scale.json]
                                               [--gpu-tflops 35] [--gpu-nodes 8 64 512]

Measured inputs come from scale.json (this machine) and RESULTS.md (MAE FLOPs per sample);
everything else is an assumption named in ASSUMED and printed with the tables, so the estimate
can be redone for another GPU, block size or sample budget by changing one number.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

H01 = {"name": "H01 (human cortex)", "voxels": 1.4e15, "voxel_nm": (33, 4, 4)}
"""~1.4 PB of uint8 at 4 x 4 x 33 nm (Shapson-Coe et al., Science 2024); MICrONS minnie65 is of
the same order."""

ASSUMED = {
    "gpu_tflops": 35.0,
    # effective bf16 TFLOP/s one GPU worker sustains (an A10G-class GPU at roughly a third of its
    # dense peak); not measured here: no GPU was lent to this task
    "mae_gflop_per_sample": 218.0,
    # ViT-B MAE, 32x160x160 crop, forward + backward (RESULTS.md: 0.074 TFLOP/s at 0.34 samples/s)
    "pretrain_samples": 1e7,
    # crops seen in pretraining (e.g. 100k steps x batch 100); ~0.6% of H01's crop-sized cubes
    "crop": (32, 160, 160),
    "serving_block": (64, 256, 256),  # ServerPool's default serving unit
    "seg_block": (128, 1024, 1024),  # blockwise segment's block at this scale (default 32x128x128)
    "halo": (4, 16, 16),  # SegmentJob default
    "marker_files_per_block": 4,  # predict, agglomerate, relabel markers + the halo npz
    "chunk_node_ram_gib": 64,  # r6i.2xlarge (cluster/aws.yaml chunk_servers)
    "head_ram_gib": 32,  # m6i.2xlarge (cluster/aws.yaml head)
    "object_store_fraction": 0.3,  # Ray's default share of node RAM
    "cpu_cores_per_gpu_node": 8,  # g5.2xlarge
}


def blocks_touched(crop, block) -> float:
    """Expected serving blocks a uniformly placed crop overlaps."""
    return math.prod(1 + (c - 1) / b for c, b in zip(crop, block, strict=True))


def face_voxels(block, halo) -> int:
    """Halo voxels one block compares with its upper neighbours when stitching."""
    z, y, x = block
    hz, hy, hx = halo
    return hz * y * x + z * hy * x + z * y * hx


def model(results: dict, gpu_tflops: float, gpu_nodes: list[int]) -> str:
    a = dict(ASSUMED, gpu_tflops=gpu_tflops)
    V = H01["voxels"]
    lines = [f"Inputs: scale.json ({results['command']}), assumptions {json.dumps(a)}", ""]

    # ---- data plane
    gpu_samples = a["gpu_tflops"] * 1e12 / (a["mae_gflop_per_sample"] * 1e9)
    crop_bytes = math.prod(a["crop"])
    block_bytes = math.prod(a["serving_block"])
    touched = blocks_touched(a["crop"], a["serving_block"])
    pool = results["server_pool"]
    one_node = pool["rows"][0]["crops_per_s"]
    decode = pool["decode_one_process"]["image"]["mb_per_s"]
    random_mb_s = gpu_samples * touched * block_bytes / 2**20
    local_mb_s = gpu_samples * crop_bytes / 2**20
    lines += [
        "| data plane, per GPU worker (MAE ViT-B) | value |",
        "|---|---:|",
        f"| GPU demand, samples/s ({a['gpu_tflops']:g} TFLOP/s / {a['mae_gflop_per_sample']:g} "
        f"GFLOP) | {gpu_samples:,.0f} |",
        f"| one consumer's crops/s from a 1-node ServerPool (measured, 2 cores) | {one_node:,.0f} |",
        f"| consumers' CPU time per GPU's crops (assembly) | {gpu_samples / one_node:.2f} core |",
        f"| serving blocks a crop touches | {touched:.1f} |",
        f"| bytes moved per crop, random crops over the whole volume, no reuse | "
        f"{touched * block_bytes / 2**20:.1f} MiB ({touched * block_bytes / crop_bytes:.0f}x "
        "the crop) |",
        f"| decode + transfer per GPU, random crops | {random_mb_s:,.0f} MiB/s |",
        f"| decode per server process (measured, raw+gzip) | {decode:,.0f} MiB/s |",
        f"| server processes per GPU, random crops | {random_mb_s / decode:,.1f} |",
        f"| transfer per GPU with a resident working set (crop bytes only) | {local_mb_s:,.0f} "
        "MiB/s |",
        "",
    ]
    ram = a["chunk_node_ram_gib"] * a["object_store_fraction"]
    resident = ram * 2**30 / block_bytes * math.prod(a["serving_block"])
    lines += [
        f"Object store per chunk-server node: {ram:.0f} GiB (of {a['chunk_node_ram_gib']} GiB) "
        f"holds {ram * 2**30 / block_bytes:,.0f} serving blocks = {resident:.2e} voxels, "
        f"{resident / V:.1e} of H01 per node.",
        "",
    ]

    # ---- pretraining hours
    pre_gpu_h = a["pretrain_samples"] * a["mae_gflop_per_sample"] * 1e9 / (
        a["gpu_tflops"] * 1e12
    ) / 3600  # fmt: skip
    # ---- segmentation
    flops = results["inference_flops"]
    vit_b = flops["ViT-B UNETR (768 wide, 12 deep)"]
    seg_flop = vit_b["flop_per_voxel"] * vit_b["network_passes_per_voxel"] * V
    seg_gpu_h = seg_flop / (a["gpu_tflops"] * 1e12) / 3600
    bw = results["blockwise"]["rows"][0]
    agg_core_vps = bw["voxels"] / bw["stages_s"]["agglomerate"]  # 1 node = 1 CPU
    agg_core_h = V / agg_core_vps / 3600
    lines += [
        "| hours on N GPU nodes (8 vCPU + 1 GPU each) | "
        + " | ".join(f"N = {n}" for n in gpu_nodes)
        + " |",
        "|---|" + "---:|" * len(gpu_nodes),
        f"| MAE ViT-B pretraining, {a['pretrain_samples']:.0e} samples "
        f"({pre_gpu_h:,.0f} GPU-h) | "
        + " | ".join(f"{pre_gpu_h / n:,.1f}" for n in gpu_nodes)
        + " |",
        f"| UNETR ViT-B prediction, whole H01 ({seg_gpu_h:,.0f} GPU-h) | "
        + " | ".join(f"{seg_gpu_h / n:,.1f}" for n in gpu_nodes)
        + " |",
        f"| agglomeration on the nodes' CPUs ({agg_core_h:,.0f} core-h) | "
        + " | ".join(f"{agg_core_h / (n * a['cpu_cores_per_gpu_node']):,.1f}" for n in gpu_nodes)
        + " |",
        "",
    ]

    # ---- blocks, markers, driver
    seg_block = a["seg_block"]
    blocks = V / math.prod(seg_block)
    default_blocks = V / (32 * 128 * 128)
    bookkeeping = results["driver_bookkeeping"]
    driver = bookkeeping["rows"][-1]  # the largest measured run
    exponent = max(0.0, bookkeeping.get("driver_cpu_per_block_exponent", 0.0))
    # per-block cost grows as blocks ** exponent (measured between the runs); extrapolated
    us_at_scale = driver["driver_cpu_us_per_block"] * (blocks / driver["blocks"]) ** exponent
    driver_cpu_h = blocks * us_at_scale * 1e-6 / 3600
    linear_h = blocks * driver["driver_cpu_us_per_block"] * 1e-6 / 3600
    driver_gib = blocks * driver["driver_bytes_per_block"] / 2**30
    stitch_s_per_face_voxel = bw["stages_s"]["stitch"] / (
        bw["blocks"] * face_voxels(results["blockwise"]["block"], a["halo"])
    )
    stitch_h = blocks * face_voxels(seg_block, a["halo"]) * stitch_s_per_face_voxel / 3600
    max_blocks_driver = a["head_ram_gib"] * 2**30 / max(1, driver["driver_bytes_per_block"])
    lines += [
        "| blockwise at H01 | value |",
        "|---|---:|",
        f"| blocks at the default 32x128x128 | {default_blocks:.2e} |",
        f"| blocks at {'x'.join(map(str, seg_block))} | {blocks:.2e} |",
        f"| marker files ({a['marker_files_per_block']} per block) | "
        f"{blocks * a['marker_files_per_block']:.2e} |",
        "| driver CPU per block, measured at "
        + ", ".join(
            f"{r['blocks']:,} blocks: {r['driver_cpu_us_per_block']:,.0f} us"
            for r in bookkeeping["rows"]
        )
        + f" (grows as blocks^{exponent:.2f}) | |",
        f"| driver CPU for bookkeeping if per-block cost stayed at the largest run's | "
        f"{linear_h:,.1f} h |",
        f"| driver CPU for bookkeeping, per-block cost extrapolated (blocks^{exponent:.2f}) | "
        f"{driver_cpu_h:,.0f} h ({us_at_scale / 1e6:,.2f} s/block) |",
        f"| driver memory with every block in flight ({driver['driver_bytes_per_block']:,} "
        f"B/block, measured) | {driver_gib:,.1f} GiB |",
        f"| blocks a {a['head_ram_gib']} GiB head holds in flight | {max_blocks_driver:.1e} |",
        f"| stitch in the driver, serial ({stitch_s_per_face_voxel * 1e9:.1f} ns per halo "
        f"voxel, measured) | {stitch_h:,.0f} h |",
        "",
    ]

    # ---- where it breaks first: the volume at which each single-process part hits its limit
    block_voxels = math.prod(seg_block)
    day_us = 24 * 3600 * 1e6
    n0, us0 = driver["blocks"], driver["driver_cpu_us_per_block"]
    # blocks * us0 * (blocks / n0) ** k = one day of driver CPU
    bookkeeping_blocks = (day_us * n0**exponent / us0) ** (1 / (1 + exponent))
    limits = [
        ("stitch (cross-block agglomeration) in the driver passes a day", V * 24 / stitch_h),
        (
            f"driver bookkeeping passes a day of CPU (per-block cost ~ blocks^{exponent:.2f})",
            bookkeeping_blocks * block_voxels,
        ),
        (
            f"driver memory, every block submitted at once, passes the {a['head_ram_gib']} GiB "
            "head",
            max_blocks_driver * block_voxels,
        ),
        (
            "agglomeration on 512 GPU nodes' CPUs passes a day",
            V * 24 / (agg_core_h / (512 * a["cpu_cores_per_gpu_node"])),
        ),
    ]
    lines += [
        f"| where it breaks, at {'x'.join(map(str, seg_block))} blocks | volume (voxels) | x H01 |",
        "|---|---:|---:|",
    ]
    for what, voxels in sorted(limits, key=lambda item: item[1]):
        lines.append(f"| {what} | {voxels:.1e} | {voxels / V:.2g} |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "scale.json"))
    parser.add_argument("--gpu-tflops", type=float, default=ASSUMED["gpu_tflops"])
    parser.add_argument("--gpu-nodes", type=int, nargs="+", default=[8, 64, 512])
    args = parser.parse_args()
    results = json.loads(Path(args.results).read_text())
    print(model(results, args.gpu_tflops, args.gpu_nodes))


if __name__ == "__main__":
    main()
