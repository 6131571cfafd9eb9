"""Pretraining samples/s (forward + backward + AdamW step) and peak memory, per configuration.

    .venv/bin/python benchmarks/pretrain_throughput.py [--steps 6] [--configs tiny base]
        [--mscon tiny] [--mscon-variants fast published] [--crop 32 160 160]

Each configuration runs in its own subprocess (so peak RSS is its own), one after the other in
the same invocation, on random crops with the real step: MAE-3D at mask ratio 0.75 with
norm_pix_loss, batch 2, crop 32×160×160, patch 4×16×16 (800 tokens), decoder 512×6 for base and
128×2 for tiny; MS-Con (pretrain_throughput_mscon.py) with the same encoder and crop, in its
fast default and its published variant. On CUDA (when present) it uses bf16 autocast and reports
model FLOPs utilisation against the peak given with --peak-tflops. FLOPs are torch's own count of
one step (FlopCounterMode: every matmul and convolution, forward and backward) for every row.

Writes ``benchmarks/results/pretrain_throughput.json`` (``--out``): one row per configuration
with ``name`` (``mae-tiny``, ``ms-con-tiny``, ``ms-con-tiny-published``, ...), ``crop``,
``device``, ``samples_per_s``, ``peak_mib``, the FLOPs, the load average before and after the row,
and for MS-Con rows ``vs_mae``: samples/s and peak memory over those of MAE with the same encoder
and crop in the same run (the judged ratios: fast samples/s >= 0.25x MAE's, peak <= 2x).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
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
MSCON_DEFAULT_VARIANT = "fast"
OUT = Path(__file__).parent / "results" / "pretrain_throughput.json"


def run_one(
    name: str, steps: int, batch: int, peak_tflops: float | None, crop: tuple[int, int, int]
) -> dict:
    """One MAE row (in this process: call it in a subprocess so the peak RSS is its own)."""
    import resource

    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from neuroray.masking import RandomMasker
    from neuroray.models.mae import MAEConfig, build_mae3d

    cfg = {**CONFIGS[name], "encoder": {**CONFIGS[name]["encoder"], "img_size": list(crop)}}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_mae3d(MAEConfig.model_validate(cfg)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rng = np.random.default_rng(0)
    grid = tuple(c // p for c, p in zip(crop, (4, 16, 16), strict=True))
    masker = RandomMasker(ratio=0.75)
    x = torch.rand(batch, 1, *crop, device=device)
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

    with FlopCounterMode(display=False) as counter:
        step()  # warm-up (allocations, kernels), counted once
    flops = counter.get_total_flops() / batch
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
    result = {
        "config": f"MAE {name}",
        "crop": list(crop),
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
        "gflop_per_sample": flops / 1e9,
    }
    if peak_tflops:
        result["mfu"] = result["achieved_tflops"] / peak_tflops
    return result


def measure(command: list[str]) -> dict:
    """Run one row's subprocess; its last stdout line is the row; the load average around it."""
    load_before = os.getloadavg()[0]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{shlex.join(command)} failed:\n{done.stderr[-2000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row.update(load_before=load_before, load_after=os.getloadavg()[0])
    return row


def table_row(
    row: dict, *, name: str, method: str, encoder: str, batch: int, steps: int, **extra
) -> dict:
    """A row of pretrain_throughput.json: the judged keys first, then the rest of the measurement."""
    return {
        "name": name,
        "crop": row["crop"],
        "device": row["device"],
        "samples_per_s": row["samples_per_s"],
        "peak_mib": row["peak_memory_mib"],
        "method": method,
        "encoder": encoder,
        **extra,
        "batch": batch,
        "timed_steps": steps,
        "gflop_per_sample": row["gflop_per_sample"],
        "achieved_tflops": row["achieved_tflops"],
        **({"mfu": row["mfu"]} if "mfu" in row else {}),
        **(
            {"augment_ms_per_sample": row["augment_ms_per_sample"]}
            if "augment_ms_per_sample" in row
            else {}
        ),
        "load_before": row["load_before"],
        "load_after": row["load_after"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument(
        "--mscon", nargs="*", default=["tiny"], choices=list(CONFIGS), help="MS-Con encoders"
    )
    parser.add_argument(
        "--mscon-variants", nargs="+", default=["fast", "published"], choices=["fast", "published"]
    )
    parser.add_argument("--crop", type=int, nargs=3, default=list(CROP), metavar=("Z", "Y", "X"))
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak, for MFU")
    parser.add_argument("--out", type=Path, default=OUT, help="the JSON table (rows of this run)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    crop = tuple(args.crop)
    if args.one:
        print(json.dumps(run_one(args.one, args.steps, args.batch, args.peak_tflops, crop)))
        return
    common = ["--steps", str(args.steps), "--batch", str(args.batch), "--crop", *map(str, crop)]
    if args.peak_tflops:
        common += ["--peak-tflops", str(args.peak_tflops)]
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rows, mae = [], {}
    for name in args.configs:
        row = measure([sys.executable, __file__, "--one", name, *common])
        mae[name] = row
        rows.append(
            table_row(
                row, name=f"mae-{name}", method="mae", encoder=name, batch=args.batch,
                steps=args.steps,
            )
        )  # fmt: skip
    mscon = Path(__file__).with_name("pretrain_throughput_mscon.py")
    for name in args.mscon:  # same measurement, its own subprocess (see that file)
        for variant in args.mscon_variants:
            row = measure(
                [sys.executable, str(mscon), "--one", name, "--variant", variant, *common]
            )
            ratios = {}
            if name in mae:
                ratios = {
                    "samples_per_s": row["samples_per_s"] / mae[name]["samples_per_s"],
                    "peak_mib": row["peak_memory_mib"] / mae[name]["peak_memory_mib"],
                }
            suffix = "" if variant == MSCON_DEFAULT_VARIANT else f"-{variant}"
            rows.append(
                table_row(
                    row, name=f"ms-con-{name}{suffix}", method="mscon", encoder=name,
                    variant=variant, batch=args.batch, steps=args.steps,
                    **({"vs_mae": ratios} if ratios else {}),
                )
            )  # fmt: skip
    command = shlex.join(["benchmarks/pretrain_throughput.py", *sys.argv[1:]])
    for row in rows:
        row.update(command=command, started=started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")

    print(
        f"\ncrop {crop}, patch (4, 16, 16), MAE mask ratio 0.75, batch {args.batch}, "
        f"{args.steps} timed steps; rows in {args.out}\n"
    )
    print(
        "| name | device | samples/s | ×MAE | GFLOP/sample | TFLOP/s | MFU | peak memory | ×MAE | load |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "–"
        speed = f"{r['vs_mae']['samples_per_s']:.3f}" if "vs_mae" in r else "–"
        memory = f"{r['vs_mae']['peak_mib']:.2f}" if "vs_mae" in r else "–"
        print(
            f"| {r['name']} | {r['device']} | {r['samples_per_s']:.3f} | {speed} | "
            f"{r['gflop_per_sample']:.1f} | {r['achieved_tflops']:.3f} | {mfu} | "
            f"{r['peak_mib']:,.0f} MiB | {memory} | {r['load_before']:.1f}→{r['load_after']:.1f} |"
        )


if __name__ == "__main__":
    main()
