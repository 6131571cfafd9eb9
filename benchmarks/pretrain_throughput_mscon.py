"""MS-Con pretraining throughput, for the side-by-side table of ``benchmarks/pretrain_throughput.py``.

    .venv/bin/python benchmarks/pretrain_throughput_mscon.py --one tiny [--variant published]
        [--steps 6] [--batch 2] [--crop 32 160 160]
    .venv/bin/python benchmarks/pretrain_throughput_mscon.py --end-to-end [--steps 40]

:func:`mscon_samples_per_second` measures one configuration exactly as pretrain_throughput.py
measures MAE: random crops already in memory, one warm-up step, then timed steps of forward +
backward + AdamW (bf16 autocast on CUDA), and returns a row with the same keys (``config``,
``device``, ``samples_per_s``, ``achieved_tflops``, ``peak_memory_mib``, ``mfu`` when a peak is
given). Run it in its own subprocess (``--one NAME`` prints the row as JSON) so the peak RSS is
its own. ``--variant`` picks the model (``fast``, the default, or ``published``; see
neuroray/models/mscon.py). One MS-Con sample is one crop: two views through the network. FLOPs
are torch's own count of one step (FlopCounterMode: every matmul and convolution, forward and
backward), since much of MS-Con's work is convolutions (the published decoder's at full
resolution). The row adds ``augment_ms_per_sample``: drawing the weak and strong views, which the training worker does
in series with the step.

:func:`mscon_end_to_end_samples_per_second` runs a whole Ray Train job instead (chunk servers on
the FIB-SEM cube, views drawn on the worker) and returns the loop's own samples/s over the second
half of the steps; :func:`second_half_samples_per_second` reads any pretraining Result made with
:func:`timing_run` settings the same way (MAE, dbMiM), for an end-to-end comparison.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from neuroray.config import validate
from neuroray.trainers.mscon import MSConJob, run_mscon

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEFAULT_IMAGE = f"{DATA}/em/fib_medulla_s1_raw.h5#raw"


# ---------------------------------------------------------------------- end-to-end (Ray Train)


def timing_run(name: str, storage_path: str, steps: int, batch_size: int, **run: Any) -> dict:
    """``run`` settings for a timing: two report windows, one checkpoint at the end."""
    half = max(1, steps // 2)
    return {
        "name": name,
        "storage_path": storage_path,
        "steps": 2 * half,
        "batch_size": batch_size,
        "steps_per_epoch": 2 * half,
        "report_every": half,
        "checkpoint_every": 2 * half,
        "preview_every": 10 * half,  # the final step still writes one preview
        "keep_checkpoints": 1,
        "max_failures": 0,
        **run,
    }


def second_half_samples_per_second(result: Any) -> float:
    """samples/s of the last report window of a run made with :func:`timing_run` settings."""
    windows = sorted((m["step"], m) for _, m in result.best_checkpoints or [])
    if not windows:
        raise RuntimeError("the run reported no checkpoint; nothing was measured")
    return float(windows[-1][1]["samples_per_s"])


def mscon_job(
    image: str = DEFAULT_IMAGE,
    *,
    crop_shape: tuple[int, int, int] = (16, 64, 64),
    patch_size: tuple[int, int, int] = (4, 16, 16),
    width: int = 192,
    depth: int = 6,
    heads: int = 3,
    variant: str = "fast",
    feature_size: int | None = None,
    pool_grid: tuple[int, int, int] | None = None,
    token_dim: int | None = 256,
    steps: int = 40,
    batch_size: int = 4,
    storage_path: str = "runs/benchmarks",
    name: str | None = None,
    run: dict[str, Any] | None = None,
) -> MSConJob:
    """An MS-Con job sized like configs/pretrain_mscon.yaml (match MAE's encoder to compare);
    ``variant`` and the fields after it as in :class:`~neuroray.models.mscon.MSConConfig` (None:
    the variant's).

    The run gets a fresh name (time-stamped) unless ``name`` is given: a timing must not resume
    an earlier run.
    """
    name = name or time.strftime("throughput_mscon_%Y%m%d_%H%M%S")
    return validate(
        MSConJob,
        {
            "data": {"image": image, "sampler": {"crop_shape": list(crop_shape)}},
            "model": {
                "encoder": {
                    "size": None,
                    "width": width,
                    "depth": depth,
                    "heads": heads,
                    "patch_size": list(patch_size),
                    "img_size": list(crop_shape),
                },
                "variant": variant,
                "feature_size": feature_size,
                "pool_grid": list(pool_grid) if pool_grid else None,
                "token_dim": token_dim,
            },
            "run": timing_run(name, storage_path, steps, batch_size, **(run or {})),
        },
    )


def mscon_end_to_end_samples_per_second(job: MSConJob | None = None, **job_args: Any) -> float:
    """Run an MS-Con job (default: :func:`mscon_job` with ``job_args``) and return samples/s."""
    job = job or mscon_job(**job_args)
    return second_half_samples_per_second(run_mscon(job))


# ---------------------------------------------------------------------- model-step rows
CROP = (32, 160, 160)


def mscon_samples_per_second(
    name: str = "tiny",
    steps: int = 6,
    batch: int = 2,
    peak_tflops: float | None = None,
    *,
    encoder: dict[str, Any] | None = None,
    crop: tuple[int, int, int] = CROP,
    model: dict[str, Any] | None = None,
    variant: str = "fast",
) -> dict[str, Any]:
    """One MS-Con row: ``encoder`` is a ViTConfig spec (default ``{"size": name}``), ``variant``
    the MSConConfig variant, ``model`` overrides other MSConConfig fields."""
    import resource

    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from neuroray.models.mscon import MSConConfig, build_mscon
    from neuroray.platform.augment import MSConAugmentConfig
    from neuroray.trainers.mscon import draw_views

    spec = {
        "encoder": {**(encoder or {"size": name}), "img_size": list(crop)},
        "variant": variant,
        **(model or {}),
    }
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = build_mscon(MSConConfig.model_validate(spec)).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    clean = torch.rand(batch, 1, *crop)
    start = time.perf_counter()
    views = draw_views(clean, MSConAugmentConfig(), np.random.default_rng(0), (10.0, 10.0, 10.0))
    augment_ms = (time.perf_counter() - start) * 1e3 / batch
    views = {k: v.to(device) for k, v in views.items()}
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )

    def step() -> None:
        with autocast:
            loss = net(views["weak"], views["strong"], views["clean"]).loss
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
    samples_per_s = steps * batch / (time.perf_counter() - t0)
    peak = (
        torch.cuda.max_memory_allocated()
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    row = {
        "config": f"MS-Con {name}" + ("" if variant == "fast" else f" {variant}"),
        "crop": list(crop),
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)",
        "samples_per_s": samples_per_s,
        "achieved_tflops": samples_per_s * flops / 1e12,
        "peak_memory_mib": peak / 2**20,
        "gflop_per_sample": flops / 1e9,
        "augment_ms_per_sample": augment_ms,
    }
    if peak_tflops:
        row["mfu"] = row["achieved_tflops"] / peak_tflops
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--one", default="tiny", help="encoder size of the model-step row")
    parser.add_argument("--variant", default="fast", choices=["fast", "published"])
    parser.add_argument("--crop", type=int, nargs=3, default=list(CROP), metavar=("Z", "Y", "X"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--end-to-end", action="store_true", help="a Ray Train run instead")
    parser.add_argument("--image", default=DEFAULT_IMAGE)
    parser.add_argument("--storage", default="runs/benchmarks")
    args = parser.parse_args()
    if args.end_to_end:
        rate = mscon_end_to_end_samples_per_second(
            image=args.image, steps=args.steps, batch_size=args.batch, storage_path=args.storage
        )
        print(f"MS-Con end to end: {rate:.2f} samples/s (crops per second; two views each)")
        return
    row = mscon_samples_per_second(
        args.one,
        args.steps,
        args.batch,
        args.peak_tflops,
        crop=tuple(args.crop),
        variant=args.variant,
    )
    print(json.dumps(row))


if __name__ == "__main__":
    main()
