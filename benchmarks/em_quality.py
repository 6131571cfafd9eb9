"""EM segmentation quality of scratch vs pretrained encoders at one fixed CPU budget.

    .venv/bin/python benchmarks/em_quality.py --out runs/em_quality            # scratch + MAE
    .venv/bin/python benchmarks/em_quality.py --pretrained dbmim=runs/x mscon=runs/y
    .venv/bin/python benchmarks/em_quality.py --mito                             # mitochondria

Neurons (fib_medulla_s2, 250³ at 10 nm, dense labels): fine-tune on z < 170, choose the waterz
threshold on the validation slab 170 ≤ z < 200, and report VOI split / merge, ARAND and CREMI
score on the untouched test slab z ≥ 200 (the issue's split, with validation carved out of the
training part so nothing is tuned on the test slab). Pretraining (MAE, and dbMiM / MS-Con when
their checkpoints are given) uses the unlabelled fib_medulla_s1_raw cube only.

Mitochondria (vnc_stack1_mito, 20 sections at 50 × 4.6 × 4.6 nm): fine-tune on sections 0–13,
validate on 14–15, report Dice and IoU on 16–19 (8×128×128 crops: the slab is 14 deep). ``--low-label F`` also trains on only a fraction F of the training
region (the setting where MS-Con claims its largest gain).

Every run uses the same encoder, crop, steps, batch and learning rate; seeds are listed with the
results. Results go to ``<out>/results.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from neuroray.errors import NeurorayError
from neuroray.platform.provenance import check_resume, local_dir, write_fingerprint
from neuroray.platform.storage import remove_tree

#: What every row changes in the shipped configs (neuroray/configs/*.yaml, `configs/` in a
#: checkout): one smaller encoder for all rows, one chunk server, 50-step epochs and logging.
SHARED_OVERRIDES = [
    "model.encoder.width=128",
    "model.encoder.depth=4",
    "model.encoder.heads=4",
    "data.num_servers=1",
    "run.steps_per_epoch=50",
    "run.report_every=50",
    "run.preview_every=50",
]
#: Pretraining rows (MAE, its random-masking control, dbMiM): a longer warm-up.
PRETRAIN_OVERRIDES = [*SHARED_OVERRIDES, "optim.warmup_steps=100"]
#: MS-Con: MAE's encoder and learning rate so the rows compare; a coarser pooled grid.
MSCON_OVERRIDES = [*PRETRAIN_OVERRIDES, "model.pool_grid=[8, 8, 8]", "optim.lr=0.0003"]
#: Fine-tuning rows, per task: (shipped config, its overrides); ROIs, crops, init are per row.
FINETUNE_CONFIGS = {
    "em": ("finetune_em", [*SHARED_OVERRIDES, "optim.warmup_steps=30", "targets.grow_boundary=0"]),
    "mito": ("finetune_mito", [*SHARED_OVERRIDES, "optim.warmup_steps=30"]),
}
CROP = [16, 64, 64]
MITO_CROP = [8, 128, 128]  # vnc_stack1 has 20 sections at 50 nm: train on 14, so crops are 8 deep


def ingest_all(data: str, layers: Path) -> dict[str, str]:
    from neuroray.platform.ingest import ingest

    sources = {
        "s1_raw": (f"{data}/em/fib_medulla_s1_raw.h5#raw", False),
        "s2_raw": (f"{data}/em/fib_medulla_s2.h5#raw", False),
        "s2_labels": (f"{data}/em/fib_medulla_s2.h5#labels", True),
        "vnc_raw": (f"{data}/em/vnc_stack1_mito.h5#raw", False),
        "vnc_mito": (f"{data}/em/vnc_stack1_mito.h5#mitochondria", True),
    }
    urls = {}
    for name, (src, labels) in sources.items():
        urls[name] = str(layers / name)
        chunks = (4, 128, 128) if name.startswith("vnc") else (64, 64, 64)
        ingest(src, urls[name], chunk_shape=chunks, labels=labels, progress=False)
    return urls


def load_job(model: type, config: str, overrides: list[str]) -> tuple[object, dict]:
    """Shipped config ``config`` with ``overrides`` (as the CLI applies them), and the row's
    record of both."""
    from neuroray import configs

    return configs.load(model, config, overrides), {
        "config": f"configs/{config}.yaml",
        "overrides": list(overrides),
    }


def _pretrain_overrides(urls: dict[str, str], out: Path, name: str, steps: int, seed: int):
    """What every pretraining row sets on top of its shared overrides: data, run, seed."""
    from neuroray.config import override

    return [
        override("data.image", urls["s1_raw"]),
        override("data.sampler.seed", seed),
        override("run.name", f"{name}_s1_seed{seed}"),
        override("run.storage_path", str(out / "runs")),
        override("run.steps", steps),
        override("run.checkpoint_every", steps),
        override("run.seed", seed),
    ]


def pretrain_mae(urls, out, steps, seed, ratio=0.75, name="mae") -> tuple[str, dict, dict]:
    from neuroray.config import override
    from neuroray.trainers.pretrain import MAEJob, pretrain

    job, spec = load_job(
        MAEJob,
        "pretrain_mae",
        [
            *PRETRAIN_OVERRIDES,
            *_pretrain_overrides(urls, out, name, steps, seed),
            override("masking.ratio", ratio),
        ],
    )
    result = pretrain(job)
    return result.checkpoint.path, result.metrics, spec


def pretrain_dbmim(urls, out, steps, seed) -> tuple[str, dict, dict]:
    from neuroray.agents.dbmim import DbMiMJob, run_dbmim
    from neuroray.config import override

    job, spec = load_job(
        DbMiMJob,
        "pretrain_dbmim",
        [
            *PRETRAIN_OVERRIDES,
            *_pretrain_overrides(urls, out, "dbmim", steps, seed),
            override("rl.seed", seed),
        ],
    )
    result = run_dbmim(job)
    return result.checkpoint.path, result.metrics, spec


def pretrain_mscon(urls, out, steps, seed) -> tuple[str, dict, dict]:
    from neuroray.trainers.mscon import MSConJob, run_mscon

    job, spec = load_job(
        MSConJob,
        "pretrain_mscon",
        [*MSCON_OVERRIDES, *_pretrain_overrides(urls, out, "mscon", steps, seed)],
    )
    result = run_mscon(job)
    return result.checkpoint.path, result.metrics, spec


def finetune_run(
    task: str,
    image: str,
    labels: str,
    init: str,
    roi,
    val_roi,
    out: Path,
    name: str,
    steps: int,
    seed: int,
    crop: list[int],
) -> tuple[str, dict, dict]:
    from neuroray.config import override
    from neuroray.trainers.finetune import FinetuneJob, finetune

    config, overrides = FINETUNE_CONFIGS[task]
    job, spec = load_job(
        FinetuneJob,
        config,
        [
            *overrides,
            override("data.image", image),
            override("data.labels", labels),
            override("data.sampler.crop_shape", crop),
            override("data.sampler.roi", roi),
            override("data.sampler.seed", seed),
            override("model.encoder.img_size", crop),
            override("model.init", init),
            override("optim.layer_decay", 0.9 if init != "scratch" else None),
            override("validation.roi", val_roi),
            override("run.name", name),
            override("run.storage_path", str(out / "runs")),
            override("run.steps", steps),
            override("run.checkpoint_every", steps),
            override("run.seed", seed),
        ],
    )
    result = finetune(job)
    return result.checkpoint.path, result.metrics, spec


def score_test_slab(
    task: str, checkpoint: str, image: str, labels: str, test_roi, threshold: float
) -> dict:
    """Predict the test slab with the fine-tuned model and score it at the chosen threshold."""
    from neuroray.platform.box import Box
    from neuroray.platform.volume import open_volume
    from neuroray.segmentation.blockwise import load_segmenter
    from neuroray.segmentation.evaluate import evaluate_arrays
    from neuroray.segmentation.inference import predict_array, segment_affinities, segment_binary
    from neuroray.segmentation.tasks import get_task

    model, job = load_segmenter(checkpoint)
    box = Box.from_list(test_roi)
    raw = open_volume(image).read(box).astype(np.float32) / 255
    truth = open_volume(labels).read(box)
    probs = predict_array(model, raw, job.model.encoder.img_size)
    if get_task(task).instances:
        seg = segment_affinities(probs, [threshold], voxel_size=open_volume(image).voxel_size)[
            threshold
        ]
        return evaluate_arrays(seg, truth, "em")
    return evaluate_arrays(segment_binary(probs[0], 0.5), truth, "binary")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=os.environ.get("NEURORAY_DATA", "../shared/data"))
    parser.add_argument("--out", default="runs/em_quality")
    parser.add_argument("--steps", type=int, default=600, help="fine-tuning steps (batch 4)")
    parser.add_argument(
        "--pretrain-steps", type=int, default=3000, help="MAE / dbMiM steps (batch 8)"
    )
    parser.add_argument(
        "--mscon-steps",
        type=int,
        default=300,
        help="MS-Con steps (batch 4; ~30x costlier per sample)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["scratch", "mae"],
        help="scratch mae dbmim control mscon (control = random masking at dbMiM's ratio)",
    )
    parser.add_argument("--pretrained", nargs="*", default=[], metavar="NAME=CHECKPOINT")
    parser.add_argument("--mito", action="store_true", help="also run the mitochondria comparison")
    parser.add_argument("--low-label", type=float, default=None, help="fraction of training region")
    parser.add_argument("--skip-neurons", action="store_true")
    parser.add_argument(
        "--overwrite", action="store_true", help="start over in --out (runs, layers, results)"
    )
    args = parser.parse_args()
    out = Path(args.out)
    # Runs, layers and results.json in --out are reused by a rerun only when they were made
    # with the same data and budgets (seeds and methods may be added); else refuse or start over.
    settings = {
        "kind": "em_quality",
        "data": str(Path(args.data).resolve()),
        **{k: getattr(args, k) for k in ("steps", "pretrain_steps", "mscon_steps", "low_label")},
    }
    if args.overwrite:
        remove_tree(local_dir(out))
    try:
        check_resume(local_dir(out), settings, what=str(out), overwrite_hint="pass --overwrite")
    except NeurorayError as err:
        raise SystemExit(f"em_quality: {err}") from None
    write_fingerprint(local_dir(out), settings)

    from neuroray.runtime import connect

    connect(num_cpus=2, object_store_mb=1024, log_to_driver=False)
    urls = ingest_all(args.data, out / "layers")
    inits = {"scratch": "scratch"} if "scratch" in args.methods else {}
    for item in args.pretrained:
        name, _, path = item.partition("=")
        inits[name] = f"checkpoint:{path}"
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else []

    def record(row: dict) -> None:
        results.append(row)
        results_path.write_text(json.dumps(results, indent=2))
        print(json.dumps(row), flush=True)

    for seed in args.seeds:
        jobs = [
            (
                "mae",
                lambda seed=seed: pretrain_mae(urls, out, args.pretrain_steps, seed),
                args.pretrain_steps,
            ),
            (
                "dbmim",
                lambda seed=seed: pretrain_dbmim(urls, out, args.pretrain_steps, seed),
                args.pretrain_steps,
            ),
            (
                "mscon",
                lambda seed=seed: pretrain_mscon(urls, out, args.mscon_steps, seed),
                args.mscon_steps,
            ),
        ]
        for method, run_pretraining, steps in jobs:
            if method not in args.methods:
                continue
            t0 = time.perf_counter()
            checkpoint, metrics, job = run_pretraining()
            inits[method] = f"checkpoint:{checkpoint}"
            record(
                {
                    "kind": "pretrain",
                    "method": method,
                    "seed": seed,
                    "steps": steps,
                    "final_loss": metrics.get("loss"),
                    "mask_ratio": metrics.get("mask_ratio"),
                    "seconds": round(time.perf_counter() - t0, 1),
                    **job,
                }
            )
            if method == "dbmim" and "control" in args.methods:
                ratio = round(float(metrics["mask_ratio"]), 2)  # where the policy settled
                t0 = time.perf_counter()
                checkpoint, metrics, job = pretrain_mae(
                    urls, out, steps, seed, ratio=ratio, name="control"
                )
                inits["control"] = f"checkpoint:{checkpoint}"
                record(
                    {
                        "kind": "pretrain",
                        "method": f"control (random masking, ratio {ratio})",
                        "seed": seed,
                        "steps": steps,
                        "final_loss": metrics.get("loss"),
                        "mask_ratio": ratio,
                        "seconds": round(time.perf_counter() - t0, 1),
                        **job,
                    }
                )
        settings = []
        if not args.skip_neurons:
            settings.append(
                (
                    "em",
                    "s2_raw",
                    "s2_labels",
                    [0, 0, 0, 170, 250, 250],
                    [170, 0, 0, 200, 250, 250],
                    [200, 0, 0, 250, 250, 250],
                    "neurons",
                    CROP,
                )
            )
        if args.mito:
            settings.append(
                (
                    "mito",
                    "vnc_raw",
                    "vnc_mito",
                    [0, 0, 0, 14, 1024, 1024],
                    [14, 0, 0, 16, 1024, 1024],
                    [16, 0, 0, 20, 1024, 1024],
                    "mito",
                    MITO_CROP,
                )
            )
        for task, image, labels, roi, val_roi, test_roi, label, crop in settings:
            rois = [("full", roi)]
            if args.low_label:  # a fraction of the training region, cut along its longest axis
                axis = int(np.argmax(np.subtract(roi[3:], roi[:3])))
                small = list(roi)
                small[axis + 3] = roi[axis] + max(
                    crop[axis], round((roi[axis + 3] - roi[axis]) * args.low_label)
                )
                rois.append((f"{args.low_label:.0%} labels", small))
            for regime, train_roi in rois:
                for method, init in inits.items():
                    name = f"{label}_{method}_{regime.split()[0]}_seed{seed}"
                    t0 = time.perf_counter()
                    checkpoint, val, job = finetune_run(
                        task,
                        urls[image],
                        urls[labels],
                        init,
                        train_roi,
                        val_roi,
                        out,
                        name,
                        args.steps,
                        seed,
                        crop,
                    )
                    threshold = float(val.get("val_threshold", 0.5))
                    scores = score_test_slab(
                        task, checkpoint, urls[image], urls[labels], test_roi, threshold
                    )
                    record(
                        {
                            "kind": label,
                            "method": method,
                            "regime": regime,
                            "seed": seed,
                            "steps": args.steps,
                            "threshold": threshold,
                            "validation": {k: v for k, v in val.items() if k.startswith("val_")},
                            "test": scores,
                            "seconds": round(time.perf_counter() - t0, 1),
                            **job,
                        }
                    )

    print(
        "\n| task | regime | method | seed | VOI split | VOI merge | VOI | ARAND | CREMI | Dice | IoU |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in results:
        if row["kind"] == "pretrain":
            continue
        t = row["test"]
        cells = [
            f"{t[k]:.3f}" if k in t else "–"
            for k in ("voi_split", "voi_merge", "voi", "arand", "cremi_score", "dice", "iou")
        ]
        print(
            f"| {row['kind']} | {row['regime']} | {row['method']} | {row['seed']} | "
            + " | ".join(cells)
            + " |"
        )
    print("\nJobs: each row's shipped config and the overrides it ran (also in results.json)")
    for row in results:
        if "config" in row:
            what = f"{row['kind']} {row.get('regime', '')} {row['method']} seed {row['seed']}"
            print(f"- {' '.join(what.split())}: {row['config']} {' '.join(row['overrides'])}")


if __name__ == "__main__":
    main()
