"""What running dbMiM's RL side costs the MIM trainer, measured side by side in one run.

Two pretraining runs of the same job (data, model, batch, steps):

1. plain MAE with random masking (the trainer alone);
2. dbMiM: the same trainer, masks placed by the RL policy (fixed count K per crop, the share
   from the policy's nominations rising over the run), MIM weights published every
   ``--publish-every`` steps, with RLlib PPO + the oracle running alongside in lock step
   (``--steps-per-policy`` trainer steps per PPO iteration, the shipped default; ``none`` lets
   each side run at its own pace).

Each side gets its own CPU share: on one machine the trainer worker is pinned to core 0 in both
runs and the RL actor and the oracle to core 1 (``rl.pin_cpus``); on a cluster they would sit on
separate nodes. So the trainer ratio isolates what the coupling costs the trainer (polling the
weight store, the policy's forward on each batch, publishing weights), not CPU sharing. The
trainer's samples/s is the median over report windows after the first (start-up) one. The RL
side's agent decisions/s and crops scored/s are from the same dbMiM run.

    .venv/bin/python benchmarks/dbmim_overhead.py                 # the real FIB-SEM cube
    .venv/bin/python benchmarks/dbmim_overhead.py --steps 120 --width 384 --depth 6

Expected on a 2-core CPU machine: a dbMiM/MAE trainer ratio near 1 (goal: at least 0.8).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from neuroray.agents.dbmim import DbMiMJob, DbMiMTask, run_dbmim
from neuroray.config import validate
from neuroray.trainers.pretrain import MAETask, pretrain

REPO = Path(__file__).resolve().parents[1]
TRAINER_CORE, RL_CORE = 0, 1


def _pin_trainer() -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {TRAINER_CORE})


class PinnedMAETask(MAETask):
    """Plain MAE with the worker pinned to the trainer's core."""

    def build_model(self):
        _pin_trainer()
        return super().build_model()


class PinnedDbMiMTask(DbMiMTask):
    """dbMiM's trainer side with the worker pinned to the trainer's core."""

    def build_model(self):
        _pin_trainer()
        return super().build_model()


def default_data() -> str:
    root = Path(os.environ.get("NEURORAY_DATA") or REPO.parent / "shared" / "data")
    return str(root / "em" / "fib_medulla_s1_raw.h5") + "#raw"


def make_job(args: argparse.Namespace, storage: str, name: str, masking: dict) -> DbMiMJob:
    crop = [int(c) for c in args.crop.split(",")]
    pinned = hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1
    return validate(
        DbMiMJob,
        {
            "data": {
                "image": args.data,
                "num_servers": 1,
                "cache_mb": 256,
                "preload": True,
                "sampler": {"crop_shape": crop},
                "augment": [],
            },
            "model": {
                "encoder": {
                    "size": None,
                    "width": args.width,
                    "depth": args.depth,
                    "heads": max(1, args.width // 64),
                    "patch_size": [4, 16, 16],
                    "img_size": crop,
                },
                "decoder_width": 128,
                "decoder_depth": 2,
                "decoder_heads": 4,
            },
            "masking": masking,
            "optim": {"lr": 1e-3, "warmup_steps": 5},
            "run": {
                "name": name,
                "storage_path": storage,
                "steps": args.steps,
                "batch_size": args.batch,
                "steps_per_epoch": 1000,
                "checkpoint_every": args.steps,
                "report_every": args.report_every,
                "preview_every": 10 * args.steps,
            },
            "rl": {
                "env": {"crops_per_episode": args.crops_per_episode},
                "ppo": {"train_batch_agent_steps": args.rl_batch, "minibatch_size": 512},
                "publish_mim_every": args.publish_every,
                "steps_per_policy": args.steps_per_policy,
                "checkpoint_every": 1000,
                "preview_every": 1000,
                "pin_cpus": [RL_CORE] if pinned else None,
            },
        },
        source="benchmark job",
    )


def trainer_samples_per_s(job: DbMiMJob) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for file in sorted(job.run.tensorboard_path().glob("events.out.tfevents.*")):
        events = EventAccumulator(str(file), size_guidance={"scalars": 0}).Reload()
        values += [e.value for e in events.Scalars("train/samples_per_s")]
    steady = values[1:] or values  # the first window holds the data and model start-up
    return statistics.median(steady)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=default_data(), help="image volume URL")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--report-every", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", default="16,64,64", help="z,y,x (patch 4x16x16)")
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--publish-every", type=int, default=10)
    parser.add_argument("--crops-per-episode", type=int, default=4)
    parser.add_argument("--rl-batch", type=int, default=1024, help="agent steps per PPO iteration")
    parser.add_argument(
        "--steps-per-policy",
        type=lambda v: None if v.lower() == "none" else int(v),
        default=10,
        help="lock-step cadence: trainer steps per PPO iteration ('none': free-running)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs of each, alternating order")
    args = parser.parse_args(argv)

    from neuroray.runtime import connect

    torch.set_num_threads(1)
    connect(num_cpus=2, object_store_mb=768, log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="dbmim_overhead_")
    rates: dict[str, list[float]] = {"mae": [], "dbmim": []}
    walls: dict[str, list[float]] = {"mae": [], "dbmim": []}
    result = None
    for r in range(args.repeats):  # alternate the order (A B B A ...) so drift cancels
        order = ("mae", "dbmim") if r % 2 == 0 else ("dbmim", "mae")
        for kind in order:
            masking = {"name": "random" if kind == "mae" else "policy", "ratio": 0.75}
            job = make_job(args, storage, f"{kind}_{r}", masking)
            tick = time.perf_counter()
            if kind == "mae":
                pretrain(job, PinnedMAETask)
            else:
                result = run_dbmim(job, PinnedDbMiMTask)
            walls[kind].append(time.perf_counter() - tick)
            rates[kind].append(trainer_samples_per_s(job))
    mae_wall, dbmim_wall = statistics.median(walls["mae"]), statistics.median(walls["dbmim"])
    mae_rate, dbmim_rate = statistics.median(rates["mae"]), statistics.median(rates["dbmim"])
    m = result.metrics
    crop = args.crop.replace(",", "x")
    print(
        f"\ndbMiM overhead: crop {crop}, ViT width {args.width} depth {args.depth}, batch "
        f"{args.batch}, {args.steps} steps, {args.repeats} run(s) each (medians); trainer on core "
        f"{TRAINER_CORE}, RL side on core {RL_CORE}; PPO iteration {args.rl_batch} decisions, "
        f"lock-step cadence {args.steps_per_policy} trainer steps per iteration\n"
    )
    print("| run | trainer samples/s | vs MAE | wall s |")
    print("|---|---|---|---|")
    print(f"| MAE, random masking | {mae_rate:.1f} | 1.00 | {mae_wall:.0f} |")
    print(
        f"| dbMiM, policy masking + RL alongside | {dbmim_rate:.1f} | "
        f"{dbmim_rate / mae_rate:.2f} | {dbmim_wall:.0f} |"
    )
    print(
        f"\nper run, MAE: {[round(v, 1) for v in rates['mae']]}, dbMiM: "
        f"{[round(v, 1) for v in rates['dbmim']]}"
    )
    print("\n| RL side (last dbMiM run) | value |")
    print("|---|---|")
    rows = [
        ("PPO iterations", f"{m['rl/iterations']}"),
        ("agent decisions/s (sampling + learning)", f"{m.get('rl/mean_decisions_per_s', 0):.0f}"),
        ("crops scored/s", f"{m.get('rl/mean_crops_per_s', 0):.1f}"),
        ("mask ratio (fixed K)", f"{m.get('rl/mask_ratio', float('nan')):.3f}"),
        ("trainer: policy lag, trainer steps", f"{m.get('policy_lag_steps', float('nan')):.1f}"),
        ("last policy entropy (nats)", f"{m.get('rl/entropy', float('nan')):.3f}"),
        ("trainer: polling + policy forward, ms/step", f"{m.get('policy_ms', 0):.2f}"),
        ("trainer: publishing MIM weights, ms/step", f"{m.get('publish_ms', 0):.2f}"),
    ]
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(f"\nruns in {storage}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
