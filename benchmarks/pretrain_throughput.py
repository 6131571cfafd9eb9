"""Pretraining samples/s (forward + backward + AdamW step) and peak memory, per configuration.

    .venv/bin/python benchmarks/pretrain_throughput.py [--steps 6] [--configs tiny base]

Each configuration runs in its own subprocess (so peak RSS is its own), in the same invocation,
on random crops with the real step: MAE-3D at mask ratio 0.75 with norm_pix_loss, batch 2, crop
32×160×160, patch 4×16×16 (800 tokens), decoder 512×6 for base and 128×2 for tiny. On CUDA
(when present) it uses bf16 autocast and reports model FLOPs utilisation against the peak given
with --peak-tflops. MS-Con rows (--mscon tiny ...) come from pretrain_throughput_mscon.py, measured
the same way; their FLOPs are torch's full count (MS-Con's work is mostly convolutions), the MAE
rows count transformer matmuls only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "tiny": {
        "encoder": {"size": "tiny"},
        "decoder_width": 128,
        "decoder_depth": 2,
        "decoder_heads": 4,
    },
    "base": {
        "encoder": {"size": "base"},
        "decoder_width": 512,
        "decoder_depth": 6,
        "decoder_heads": 16,
    },
}
CROP = (32, 160, 160)


def mae_flops_per_sample(cfg, tokens: int, visible: int) -> float:
    """Matmul FLOPs of one forward (x3 for forward + backward), transformer blocks only."""
    from neuroray.models.vit3d import ViTConfig

    width, depth, _ = ViTConfig.model_validate(cfg["encoder"]).dims()

    def blocks(n, d, layers):
        return layers * (24 * n * d * d + 4 * n * n * d)

    return 3 * (
        blocks(visible, width, depth) + blocks(tokens, cfg["decoder_width"], cfg["decoder_depth"])
    )


def run_one(name: str, steps: int, batch: int, peak_tflops: float | None) -> dict:
    import resource

    import numpy as np
    import torch

    from neuroray.masking import RandomMasker
    from neuroray.models.mae import MAEConfig, build_mae3d

    cfg = {**CONFIGS[name], "encoder": {**CONFIGS[name]["encoder"], "img_size": list(CROP)}}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_mae3d(MAEConfig.model_validate(cfg)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rng = np.random.default_rng(0)
    grid = tuple(c // p for c, p in zip(CROP, (4, 16, 16), strict=True))
    masker = RandomMasker(ratio=0.75)
    x = torch.rand(batch, 1, *CROP, device=device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )

    def step():
        mask = torch.from_numpy(masker.mask((batch, *grid), rng)).to(device)
        with autocast:
            loss = model(x, mask).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up (allocations, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    samples_per_s = steps * batch / seconds
    tokens = grid[0] * grid[1] * grid[2]
    flops = mae_flops_per_sample(cfg, tokens, tokens - round(0.75 * tokens))
    result = {
        "config": f"MAE {name}",
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)",
        "samples_per_s": samples_per_s,
        "achieved_tflops": samples_per_s * flops / 1e12,
        "peak_memory_mib": (
            torch.cuda.max_memory_allocated()
            if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )
        / 2**20,
    }
    if peak_tflops:
        result["mfu"] = result["achieved_tflops"] / peak_tflops
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--mscon", nargs="*", default=["tiny"], help="MS-Con configs to add")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak, for MFU")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.steps, args.batch, args.peak_tflops)))
        return
    rows = []
    for name in args.configs:
        command = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
        ]
        if args.peak_tflops:
            command += ["--peak-tflops", str(args.peak_tflops)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    mscon = Path(__file__).with_name("pretrain_throughput_mscon.py")
    for name in args.mscon:  # same measurement, its own subprocess (see that file)
        command = [
            sys.executable,
            str(mscon),
            "--one",
            name,
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["config"] = f"MS-Con {name}"
        rows.append(row)
    print(
        f"\ncrop {CROP}, patch (4, 16, 16), mask ratio 0.75, batch {args.batch}, {args.steps} timed steps\n"
    )
    print("| config | device | samples/s | TFLOP/s | MFU | peak memory |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "–"
        print(
            f"| {r['config']} | {r['device']} | {r['samples_per_s']:.2f} | {r['achieved_tflops']:.3f} | {mfu} | {r['peak_memory_mib']:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
