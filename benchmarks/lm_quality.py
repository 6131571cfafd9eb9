"""LM neuron segmentation on matched wall-clock budgets, three seeds, baseline first.

    .venv/bin/python benchmarks/lm_quality.py --out runs/lm_quality [--budget-min 5] [--seeds 0 1 2]

Data: DIADEM Olfactory Projection Fibers, OP_1–OP_4 train, OP_5–OP_6 test (TIFF + gold SWC).
Labels: the gold SWC rasterised with the real anisotropy (x, y 0.3296 µm, z 0.9988 µm: a ball of
r px is r/3 slices tall) and a radius floor of ``--radius-floor`` px (the gold radii are thin:
the neuron covers 0.01–0.1% of a stack, so the floor changes Dice a lot).

Rows: the **no-learning baseline** first (``segmentation.baseline.fit_binary_baseline``: the
Gaussian-smoothed image above one global threshold; smoothing, threshold and polarity chosen on
OP_1–OP_4 by mean Dice), then each learned row of ``--rows``: ``unet`` (the residual U-Net from
scratch), ``unetr`` (UNETR from scratch), ``unetr-2d3d`` (UNETR whose encoder is the 2D ViT
pretrained offline on scikit-image's photographs, ``neuroray models pretrain-2d``, inflated to
3D by center inflation; its pretraining time is stated separately and done once) and
``unetr-2d3d-average`` (average inflation). Every learned row trains for the same
``--budget-min`` minutes on the whole machine (``run.time_budget_s``) from the shipped
``configs/finetune_lm.yaml`` with LM_OVERRIDES and the row's own; its validation (on OP_4, a
training stack: no test stack is touched by any choice) chooses the probability threshold that
travels in the checkpoint and is used on the test stacks.

Each seed's value is the mean over OP_5 and OP_6 of Dice, IoU, HD95 (µm) on voxels and ESA /
DSA (µm), PDS and node F1 (2 µm) of the prediction's skeleton against the gold SWC; the per-stack
values stay in ``<out>/rows.jsonl``. Resumable in parts like ``em_quality.py``; writes
``benchmarks/results/lm.json`` in the same schema.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from quality_tables import RowLog, print_table, write_table

from neuroray.errors import NeurorayError
from neuroray.platform.provenance import check_resume, local_dir, write_fingerprint
from neuroray.platform.storage import remove_tree

#: What every learned row changes in the shipped configs/finetune_lm.yaml (neuroray/configs/):
#: crops anywhere in OP_1..OP_4 (validation on OP_4), drawn around labelled chunks, one chunk
#: server, no encoder freeze or layer decay, a checkpoint (with validation) at the end only.
LM_OVERRIDES = [
    "data.num_servers=1",
    "data.sampler.roi=null",
    "data.sampler.min_foreground=1.0e-6",
    "data.sampler.foreground_from=manifest",
    "model.freeze_encoder_steps=0",
    "optim.layer_decay=null",
    "optim.warmup_steps=30",
    "run.steps=1000000",
    "run.checkpoint_every=1000000",
    "run.steps_per_epoch=50",
    "run.report_every=25",
    "run.preview_every=1000000",
]
ROW_MODELS = {
    "unet": ["model.name=unet", "model.unet.size=small", "optim.lr=0.0005", "run.batch_size=2",
             "data.sampler.crop_shape=[16, 96, 96]"],
    "unetr": ["model.name=unetr", "optim.lr=0.0005", "data.sampler.crop_shape=[16, 64, 64]",
              "model.encoder.img_size=[16, 64, 64]"],
}  # fmt: skip
INITS = {  # row -> (model, inflation, needs the 2D ViT)
    "unet": ("unet", "center", False),
    "unetr": ("unetr", "center", False),
    "unetr-2d3d": ("unetr", "center", True),
    "unetr-2d3d-average": ("unetr", "average", True),
}
METRICS = {"dice": "dice", "iou": "iou", "esa": "esa_um", "dsa": "dsa_um", "pds": "pds",
           "hd95": "hd95_um", "node_f1": "node_f1"}  # fmt: skip


def load_stack(data: str, n: int, radius_floor: float):
    """One OP stack: image, gold mask, gold tree, voxel size."""
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


def score_stacks(segment, test: dict) -> dict[str, Any]:
    """Per-stack scores of ``segment(image) -> mask`` and their mean over the test stacks."""
    from neuroray.segmentation.lm_metrics import lm_scores

    stacks = {}
    for n, (image, gold, tree, voxel) in test.items():
        s = lm_scores(segment(image), gold, tree, voxel).as_dict()
        stacks[f"OP_{n}"] = {key: round(float(s[field]), 4) for key, field in METRICS.items()}
    mean = {k: round(statistics.fmean(s[k] for s in stacks.values()), 4) for k in METRICS}
    return {"test": mean, "stacks": stacks}


def baseline_row(train: list, test: dict) -> dict[str, Any]:
    from neuroray.segmentation.baseline import fit_binary_baseline

    baseline = fit_binary_baseline([t[0] for t in train], [t[1] for t in train], train[0][3])
    return {"name": f"no-learning: {baseline.describe()}", "model": "none", "init": "none",
            "params": baseline.params(), **score_stacks(baseline.segment, test),
            "overrides": [],
            "config": "neuroray/segmentation/baseline.py (fit_binary_baseline defaults)"}  # fmt: skip


def learned_row(row: str, layers, vit2d: str, test: dict, out: Path, seed: int,
                budget_s: float) -> dict[str, Any]:  # fmt: skip
    """Fine-tune one row for ``budget_s`` of training time, then score the test stacks at the
    threshold its validation chose."""
    from neuroray import configs
    from neuroray.config import override
    from neuroray.platform.augment import as_float_image
    from neuroray.segmentation.blockwise import load_segmenter
    from neuroray.segmentation.inference import predict_array
    from neuroray.trainers.finetune import FinetuneJob, finetune

    model, inflate, pretrained = INITS[row]
    init = f"file:{vit2d}" if pretrained else "scratch"
    overrides = [
        *LM_OVERRIDES,
        *ROW_MODELS[model],
        override("data.image", layers.image),
        override("data.labels", layers.labels),
        override("data.sampler.seed", seed),
        override("model.init", init),
        override("model.inflate", inflate),
        override("validation.roi", layers.roi(list(layers.stacks)[-1])),
        override("run.name", f"lm_{row}_seed{seed}"),
        override("run.storage_path", str(out / "runs")),
        override("run.time_budget_s", budget_s),
        override("run.seed", seed),
    ]
    result = finetune(configs.load(FinetuneJob, "finetune_lm", overrides))
    network, info = load_segmenter(result.checkpoint.path)

    def segment(image: np.ndarray) -> np.ndarray:
        return predict_array(network, as_float_image(image), info.window)[0] > info.threshold

    t0 = time.perf_counter()
    scores = score_stacks(segment, test)
    metrics = result.metrics
    return {
        "name": f"{model} {'scratch' if init == 'scratch' else f'2D→3D {inflate}'}",
        "model": model,
        "init": init,
        "steps": int(metrics["step"]),
        "trained_s": round(float(metrics["trained_s"]), 1),
        "samples_per_s": round(float(metrics.get("samples_per_s", 0.0)), 2),
        "threshold": info.threshold,
        "validation": {k: v for k, v in metrics.items() if k.startswith("val_")},
        "test_s": round(time.perf_counter() - t0, 1),
        **scores,
        "config": "configs/finetune_lm.yaml",
        "overrides": overrides,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=os.environ.get("NEURORAY_DATA", "../shared/data"))
    parser.add_argument("--out", default="runs/lm_quality")
    parser.add_argument("--rows", nargs="*", default=["unet", "unetr", "unetr-2d3d"],
                        choices=sorted(INITS))  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget-min", type=float, default=5.0, help="training minutes per row")
    parser.add_argument("--radius-floor", type=float, default=1.5)
    parser.add_argument("--vit2d", default=None, help="2D ViT checkpoint (default: pretrain one)")
    parser.add_argument("--pretrain-2d-steps", type=int, default=300)
    parser.add_argument("--overwrite", action="store_true", help="start over in --out")
    args = parser.parse_args()
    out = Path(args.out)
    budget_s = args.budget_min * 60
    settings = {"kind": "lm_quality/2", "data": str(Path(args.data).resolve()),
                "budget_s": budget_s, "radius_floor": args.radius_floor,
                "vit2d": args.vit2d, "pretrain_2d_steps": args.pretrain_2d_steps}  # fmt: skip
    if args.overwrite:
        remove_tree(local_dir(out))
    try:
        check_resume(local_dir(out), settings, what=str(out), overwrite_hint="pass --overwrite")
    except NeurorayError as err:
        raise SystemExit(f"lm_quality: {err}") from None
    write_fingerprint(local_dir(out), settings)

    from neuroray.models.pretrain2d import pretrain_2d
    from neuroray.platform.lm_data import op_pairs, prepare_lm_stacks
    from neuroray.runtime import connect

    connect(object_store_mb=1024, log_to_driver=False)
    train = [load_stack(args.data, n, args.radius_floor) for n in (1, 2, 3, 4)]
    test = {n: load_stack(args.data, n, args.radius_floor) for n in (5, 6)}

    def tables(records: list[dict]) -> None:
        rows = write_table("lm", "test", records, label_fraction=1.0, budget_s=budget_s)
        print_table("lm", rows, ["dice", "iou", "esa"])

    log = RowLog(out / "rows.jsonl", tables)
    log.run("no-learning", 0, lambda: baseline_row(train, test))
    vit2d = args.vit2d
    if vit2d is None and any(INITS[row][2] for row in args.rows):
        vit2d = str(out / "vit2d" / "vit2d.safetensors")
        if not Path(vit2d).exists():
            t0 = time.perf_counter()
            pretrain_2d(output=str(out / "vit2d"), steps=args.pretrain_2d_steps, progress=False)
            print(f"2D ViT pretrained in {time.perf_counter() - t0:.0f} s (once, for every seed)")
    layers = prepare_lm_stacks(
        op_pairs(args.data, [1, 2, 3, 4]), out / "layers" / "train",
        radius_floor_px=args.radius_floor, overwrite=True,
    )  # fmt: skip
    for seed in args.seeds:
        for row in args.rows:
            log.run(row, seed, lambda row=row, seed=seed: learned_row(
                row, layers, vit2d, test, out, seed, budget_s))  # fmt: skip


if __name__ == "__main__":
    main()
