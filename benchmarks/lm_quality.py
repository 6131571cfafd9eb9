"""LM neuron segmentation: scratch vs 2D→3D average vs center inflation, at one CPU budget.

    .venv/bin/python benchmarks/lm_quality.py --out runs/lm_quality [--steps 400] [--seeds 0]

Data: DIADEM Olfactory Projection Fibers, OP_1–OP_4 train, OP_5–OP_6 test (TIFF + gold SWC).
Labels: the gold SWC rasterised with the real anisotropy (x, y 0.3296 µm, z 0.9988 µm: a ball of
r px is r/3 slices tall) and a radius floor of ``--radius-floor`` px (the gold radii are thin:
the neuron covers 0.01–0.1% of a stack, so the floor changes Dice a lot).
Rows: a no-learning baseline (``neuroray.segmentation.baseline.fit_binary_baseline``: the
Gaussian-smoothed image above one global threshold, smoothing, threshold and polarity chosen on
the training stacks by mean Dice), then UNETRs with the same encoder architecture trained from
scratch or initialised from the 2D ViT pretrained offline on scikit-image's photographs
(``neuroray models pretrain-2d``) with average or center inflation. Same crops (seeded), steps,
batch and learning rate for every learned row. Test metrics: Dice, IoU, HD95 (µm) on voxels;
ESA / DSA / PDS and node F1 (2 µm) of the prediction's skeleton against the gold SWC.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

CROP = [16, 64, 64]
#: What every learned row changes in the shipped configs/finetune_lm.yaml (neuroray/configs/):
#: 16x64x64 crops anywhere in OP_1..OP_4 (validation on OP_4), one chunk server, no encoder
#: freeze or layer decay, and a short run; data paths, seed, init and inflation are per row.
LM_OVERRIDES = [
    "data.num_servers=1",
    f"data.sampler.crop_shape={CROP}",
    f"model.encoder.img_size={CROP}",
    "data.sampler.roi=null",
    "data.sampler.min_foreground=1.0e-6",
    "data.sampler.foreground_from=manifest",
    "model.freeze_encoder_steps=0",
    "optim.lr=0.0005",
    "optim.layer_decay=null",
    "optim.warmup_steps=30",
    "run.steps_per_epoch=50",
    "run.report_every=50",
    "run.preview_every=50",
]


def lm_job(image, labels, val_roi, out: Path, method, init, inflate, seed, steps):
    """One learned row's fine-tuning job: the shipped config with LM_OVERRIDES and the row's
    own settings; returns the job and the row's record of config and overrides."""
    from neuroray import configs
    from neuroray.config import override
    from neuroray.trainers.finetune import FinetuneJob

    overrides = [
        *LM_OVERRIDES,
        override("data.image", image),
        override("data.labels", labels),
        override("data.sampler.seed", seed),
        override("model.init", init),
        override("model.inflate", inflate),
        override("validation.roi", val_roi),
        override("run.name", f"lm_{method.split()[-1]}_seed{seed}"),
        override("run.storage_path", str(out / "runs")),
        override("run.steps", steps),
        override("run.checkpoint_every", steps),
        override("run.seed", seed),
    ]
    job = configs.load(FinetuneJob, "finetune_lm", overrides)
    return job, {"config": "configs/finetune_lm.yaml", "overrides": overrides}


def load_stack(data: str, n: int, radius_floor: float):
    from neuroray.platform.lm_data import label_mask
    from neuroray.platform.swc import read_swc
    from neuroray.platform.volume import open_volume

    volume = open_volume(f"{data}/lm/OP_{n}.tif")
    image = volume[:]
    gold = label_mask(
        f"{data}/lm/OP_{n}.swc", image.shape, volume.voxel_size, radius_floor_px=radius_floor
    )
    tree = read_swc(f"{data}/lm/OP_{n}.swc", allow_zero_radius=True)
    return image, gold, tree, volume.voxel_size


def score(prediction: np.ndarray, gold: np.ndarray, tree, voxel_size) -> dict:
    from neuroray.segmentation.lm_metrics import lm_scores

    s = lm_scores(prediction, gold, tree, voxel_size)
    return {
        "dice": s.dice,
        "iou": s.iou,
        "hd95_um": s.hd95_um,
        "esa_um": s.esa_um,
        "dsa_um": s.dsa_um,
        "pds": s.pds,
        "node_f1": s.node_f1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=os.environ.get("NEURORAY_DATA", "../shared/data"))
    parser.add_argument("--out", default="runs/lm_quality")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--radius-floor", type=float, default=1.5)
    parser.add_argument("--vit2d", default=None, help="2D ViT checkpoint (default: pretrain one)")
    parser.add_argument("--pretrain-2d-steps", type=int, default=300)
    args = parser.parse_args()

    from neuroray.models.pretrain2d import pretrain_2d
    from neuroray.platform.lm_data import op_pairs, prepare_lm_stacks
    from neuroray.runtime import connect
    from neuroray.segmentation.baseline import fit_binary_baseline
    from neuroray.segmentation.blockwise import load_segmenter
    from neuroray.segmentation.inference import predict_array
    from neuroray.trainers.finetune import finetune

    connect(num_cpus=2, object_store_mb=1024, log_to_driver=False)
    out = Path(args.out)
    results = []
    train = [load_stack(args.data, n, args.radius_floor) for n in (1, 2, 3, 4)]
    test = {n: load_stack(args.data, n, args.radius_floor) for n in (5, 6)}

    baseline = fit_binary_baseline(
        [image for image, _, _, _ in train], [gold for _, gold, _, _ in train], train[0][3]
    )
    for n, (image, gold, tree, voxel) in test.items():
        results.append(
            {
                "method": f"no-learning: {baseline.describe()}",
                "seed": None,
                "stack": f"OP_{n}",
                **score(baseline.segment(image), gold, tree, voxel),
                "params": baseline.params(),
            }
        )
        print(json.dumps(results[-1]), flush=True)

    if args.vit2d:
        source = f"file:{args.vit2d}"
    else:
        source = pretrain_2d(
            output=str(out / "vit2d"), steps=args.pretrain_2d_steps, progress=False
        ).source
    layers = prepare_lm_stacks(
        op_pairs(args.data, [1, 2, 3, 4]),
        out / "layers" / "train",
        radius_floor_px=args.radius_floor,
    )
    last_stack = list(layers.stacks)[-1]
    val_roi = layers.roi(last_stack)  # validation (Dice at checkpoints) on OP_4: a training stack
    for seed in args.seeds:
        for method, init, inflate in (
            ("scratch", "scratch", "center"),
            ("2D→3D average", source, "average"),
            ("2D→3D center", source, "center"),
        ):
            t0 = time.perf_counter()
            job, spec = lm_job(
                layers.image, layers.labels, val_roi, out, method, init, inflate, seed, args.steps
            )
            checkpoint = finetune(job).checkpoint.path
            model, _ = load_segmenter(checkpoint)
            for n, (image, gold, tree, voxel) in test.items():
                probs = predict_array(model, image.astype(np.float32) / 255, CROP)[0]
                results.append(
                    {
                        "method": method,
                        "seed": seed,
                        "stack": f"OP_{n}",
                        "steps": args.steps,
                        "seconds": round(time.perf_counter() - t0, 1),
                        **score(probs > 0.5, gold, tree, voxel),
                        **spec,
                    }
                )
                print(json.dumps(results[-1]), flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=2))

    print(f"\nlabels: gold SWC rasterised, radius floor {args.radius_floor} px, anisotropic voxels")
    print("| method | seed | stack | Dice | IoU | HD95 µm | ESA µm | DSA µm | PDS | node F1 |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['method']} | {r['seed']} | {r['stack']} | {r['dice']:.3f} | {r['iou']:.3f} | {r['hd95_um']:.1f} | "
            f"{r['esa_um']:.2f} | {r['dsa_um']:.2f} | {r['pds']:.3f} | {r['node_f1']:.3f} |"
        )
    print(
        "\nJobs: each learned row's shipped config and the overrides it ran (also in results.json)"
    )
    for r in results:
        if "config" in r and r["stack"] == f"OP_{min(test)}":  # once per method and seed
            print(f"- {r['method']} seed {r['seed']}: {r['config']} {' '.join(r['overrides'])}")


if __name__ == "__main__":
    main()
