"""EM segmentation quality tables on matched wall-clock budgets, three seeds, baseline first.

    .venv/bin/python benchmarks/em_quality.py                                    # EM neurons
    .venv/bin/python benchmarks/em_quality.py --rows unet --seeds 3 4            # add seeds later
    .venv/bin/python benchmarks/em_quality.py --low-label 0.1                    # 10% of labels
    .venv/bin/python benchmarks/em_quality.py --task mito                        # mitochondria
    .venv/bin/python benchmarks/em_quality.py --rows unetr-mae --pretrain-min 15 # MAE first
    .venv/bin/python benchmarks/em_quality.py --rows unetr-mae unetr-mscon --pretrain-only

**Neurons** (fib_medulla_s2, 250³ at 10 nm, dense labels): fine-tune on z < 170, validate on
170 ≤ z < 200 (where each row chooses its waterz threshold), test on z ≥ 200, untouched by any
choice. Every EM row's model also segments **fib_gala_train** (another FIB-SEM cube, never seen;
0 = boundary) at the threshold its own validation chose: the cross-volume table.
``--low-label F`` fine-tunes on a contiguous fraction F of the training region: a slab from z 0
(EM), or a y-x square from the corner of every training section (mito, whose 14 sections cannot
be cut).
**Mitochondria** (vnc_stack1_mito, 20 sections at 50 × 4.6 × 4.6 nm): train 0–13, validate
14–15 (threshold chosen there), test 16–19.

Rows: the **no-learning baseline** first (segmentation/baseline.py: smoothed intensity → waterz
for EM, one intensity threshold for mito; parameters chosen on z < 200 / sections 0–15, i.e. on
training and validation data), then each learned row of ``--rows``: ``unet`` (the residual U-Net
from scratch), ``unetr`` (UNETR from scratch), a UNETR whose encoder was pretrained on the
unlabelled fib_medulla_s1_raw cube for ``--pretrain-min`` minutes (per seed, or once with
``--pretrain-seed``): ``unetr-mae`` (MAE),
``unetr-mscon`` (MS-Con, the fast default) and ``unetr-mscon-published`` (MS-Con as published),
and any ``--pretrained NAME=CHECKPOINT`` (a UNETR initialised from that checkpoint). A
pretraining is done once per (method, minutes, seed) under ``<out>/pretrain`` and reused by every
table and task of the same ``--out`` (``--pretrain-only`` runs just those). Every learned row
trains for the same ``--budget-min`` minutes of training time on the whole machine
(``run.time_budget_s``; validation and test inference are not counted), from the shipped config
(``configs/finetune_em.yaml`` / ``finetune_mito.yaml``) with the overrides listed per row.

Runs are resumable in parts: each (row, seed) is appended to ``<out>/rows.jsonl`` when it
finishes and skipped by a rerun with the same settings; ``benchmarks/results/<table>.json`` is
rewritten after each (``em_neurons``, ``em_neurons_low_label``, ``em_cross_volume``, ``mito``):
one entry per row with ``name``, ``model``, ``init``, ``budget_s``, ``label_fraction``, ``seeds``,
per-seed lists of each metric, their mean and sd, and the config file and overrides.
Seeds run interleaved (seed 0 of every row, then seed 1, ...) so load on a shared machine falls
on every row alike; each record keeps the 1-minute load average before and after it.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from quality_tables import RowLog, print_table, write_table

from neuroray.errors import NeurorayError
from neuroray.platform.provenance import check_resume, local_dir, write_fingerprint
from neuroray.platform.storage import remove_tree

UNETR_ENCODER = [  # one small ViT for every UNETR row, CPU-sized (the shipped config's is larger)
    "model.encoder.width=128",
    "model.encoder.depth=4",
    "model.encoder.heads=4",
]
#: What every learned row changes in its shipped config: one chunk server, logging, and a
#: checkpoint (with validation) only at the end of the budget.
SHARED = [
    "data.num_servers=1",
    "run.steps=1000000",
    "run.checkpoint_every=1000000",
    "run.steps_per_epoch=50",
    "run.report_every=25",
    "run.preview_every=1000000",
]
TASKS = {
    "em": {
        "config": "finetune_em",
        "image": ("em/fib_medulla_s2.h5#raw", (64, 64, 64)),
        "labels": ("em/fib_medulla_s2.h5#labels", (64, 64, 64)),
        "train": [0, 0, 0, 170, 250, 250],
        "validate": [170, 0, 0, 200, 250, 250],
        "test": [200, 0, 0, 250, 250, 250],
        "crops": {"unet": [16, 96, 96], "unetr": [16, 64, 64]},
        "overrides": ["optim.warmup_steps=30"],
        # four levels 8-24-72-216, z pooled once: best validation VOI of the 6-minute probes
        # (1.43-1.54 over 3 seeds, against 1.60-1.81 for the small U-Net; RESULTS.md issue 14)
        "unet": [
            "model.unet.size=null",
            "model.unet.channels=[8,24,72,216]",
            "model.unet.downsample=[[1,2,2],[2,2,2],[2,2,2]]",
            "optim.lr=0.0005",
        ],
        "table": "em_neurons",
        # another FIB-SEM cube no row ever sees: each row segments it at its own threshold
        "cross": {
            "table": "em_cross_volume",
            "image": ("em/fib_gala_train.h5#raw", (25, 50, 100)),
            "labels": ("em/fib_gala_train.h5#labels", (25, 50, 100)),
            "roi": [0, 0, 0, 50, 100, 200],
        },
        "pretrain": ("em/fib_medulla_s1_raw.h5#raw", (64, 64, 64)),
    },
    "mito": {
        "config": "finetune_mito",
        "image": ("em/vnc_stack1_mito.h5#raw", (4, 128, 128)),
        "labels": ("em/vnc_stack1_mito.h5#mitochondria", (4, 128, 128)),
        "train": [0, 0, 0, 14, 1024, 1024],
        "validate": [14, 0, 0, 16, 1024, 1024],
        "test": [16, 0, 0, 20, 1024, 1024],
        "crops": {"unet": [8, 128, 128], "unetr": [8, 128, 128]},
        "overrides": ["optim.warmup_steps=30"],
        # a mitochondrion is 60-130 px across at 4.6 nm: five levels, never pooled in z (50 nm
        # sections), see it whole (one-seed probe: Dice 0.50 against 0.31 for the small U-Net)
        "unet": [
            "model.unet.size=null",
            "model.unet.channels=[8,16,48,144,288]",
            "model.unet.downsample=[[1,2,2],[1,2,2],[1,2,2],[1,2,2]]",
            "optim.lr=0.001",
        ],
        "table": "mito",
        "low_label_axes": (1, 2),  # 10%: y, x < 324 on all 14 sections (5.8% foreground, all 4.4%)
        "pretrain": ("em/fib_medulla_s1_raw.h5#raw", (64, 64, 64)),
    },
}
#: Rows whose UNETR encoder is pretrained first: row -> (method in PRETRAIN_METHODS, the
#: method's overrides, the row's name in the tables). Each method runs from its shipped
#: configs/pretrain_<method>.yaml with the UNETR rows' encoder, for the same minutes.
PRETRAININGS = {
    "unetr-mae": ("mae", ["optim.warmup_steps=100"], "mae → unetr"),
    "unetr-mscon": ("mscon", ["model.variant=fast"], "ms-con → unetr"),
    "unetr-mscon-published": ("mscon", ["model.variant=published"], "ms-con published → unetr"),
}
ROW_MODELS = {
    # batch 2: about UNETR's voxels per step (16x96x96 x 2 vs 16x64x64 x 4); full-resolution 3D
    # convs are what a CPU step costs. The task's "unet" entry sets levels and learning rate.
    "unet": ["model.name=unet", "run.batch_size=2"],
    "unetr": ["model.name=unetr", *UNETR_ENCODER],
}


# ---------------------------------------------------------------------- data
def ingest_layers(data: str, layers: Path, task: str) -> dict[str, str]:
    """The task's image and labels, its pretraining cube and cross-volume pair, as layers."""
    from neuroray.platform.ingest import ingest

    spec = TASKS[task]
    sources = {k: spec[k] for k in ("image", "labels", "pretrain") if k in spec}
    if "cross" in spec:
        sources.update(cross_image=spec["cross"]["image"], cross_labels=spec["cross"]["labels"])
    urls = {}
    for name, (source, chunks) in sources.items():
        urls[name] = str(layers / ("shared" if name == "pretrain" else task) / name)
        labels = "labels" in name
        ingest(f"{data}/{source}", urls[name], chunk_shape=chunks, labels=labels, progress=False)
    return urls


def read(url: str, roi: list[int]) -> np.ndarray:
    from neuroray.platform.box import Box
    from neuroray.platform.volume import open_volume

    return open_volume(url).read(Box.from_list(roi))


def voxel_size(url: str) -> tuple[float, float, float]:
    from neuroray.platform.volume import open_volume

    return tuple(open_volume(url).voxel_size)  # type: ignore[return-value]


# ---------------------------------------------------------------------- rows
def baseline_row(task: str, urls: dict[str, str]) -> dict[str, Any]:
    """The no-learning row: parameters chosen on training + validation data, scored on test."""
    from neuroray.segmentation.baseline import fit_binary_baseline, fit_em_baseline
    from neuroray.segmentation.tasks import get_task

    spec = TASKS[task]
    choose = [*spec["train"][:3], *spec["validate"][3:]]  # train + validate: everything not test
    vs = voxel_size(urls["image"])
    fit = fit_em_baseline if get_task(task).instances else fit_binary_baseline
    baseline = fit(read(urls["image"], choose), read(urls["labels"], choose), vs)
    tests = {"test": score(task, baseline.segment(read(urls["image"], spec["test"])),
                           read(urls["labels"], spec["test"]), vs)}  # fmt: skip
    if "cross" in spec:
        roi = spec["cross"]["roi"]
        tests["cross"] = score(task, baseline.segment(read(urls["cross_image"], roi)),
                               read(urls["cross_labels"], roi), vs)  # fmt: skip
    return {"name": f"no-learning: {baseline.describe()}", "model": "none", "init": "none",
            "params": baseline.params(), **tests, "overrides": [],
            "config": f"neuroray/segmentation/baseline.py ({fit.__name__} defaults)"}  # fmt: skip


def score(task: str, segmentation: np.ndarray, labels: np.ndarray, vs) -> dict[str, float]:
    from neuroray.segmentation.tasks import get_task

    metrics = get_task(task).evaluate(segmentation, labels, voxel_size=vs)
    return {k: round(float(v), 4) for k, v in metrics.items()}


def pretrain(row: str, pretrain_url: str, runs: Path, minutes: float, seed: int) -> dict:
    """Pretrain the encoder of ``row`` for ``minutes`` of training time on the unlabelled cube,
    once: a finished pretraining (``<runs>/<name>/pretrained.json``) is reused by every table
    and task, but only if it was made by the same overrides. Its checkpoint, steps and time."""
    import json

    from neuroray import configs
    from neuroray.config import override
    from neuroray.trainers.methods import PRETRAIN_METHODS

    method, extra, _ = PRETRAININGS[row]
    name = f"{row.removeprefix('unetr-')}_{minutes:g}min_seed{seed}"
    overrides = [
        *UNETR_ENCODER,
        "data.num_servers=1",
        *extra,
        override("data.image", pretrain_url),
        override("data.sampler.seed", seed),
        override("run.name", name),
        override("run.storage_path", str(runs)),
        "run.steps=1000000",
        "run.checkpoint_every=1000000",
        "run.preview_every=1000000",
        override("run.time_budget_s", minutes * 60),
        override("run.seed", seed),
    ]
    done = runs / name / "pretrained.json"
    if done.exists():
        record = json.loads(done.read_text())
        if record["overrides"] != overrides:
            raise SystemExit(f"em_quality: {done.parent} was pretrained with other overrides; "
                             "remove that folder to pretrain it again")  # fmt: skip
        return record
    registered = PRETRAIN_METHODS.get(method)
    started = time.perf_counter()
    result = registered.run(configs.load(registered.job_class, f"pretrain_{method}", overrides))
    record = {
        "checkpoint": result.checkpoint.path,
        "method": method,
        "steps": int(result.metrics["step"]),
        "trained_s": round(float(result.metrics["trained_s"]), 1),
        "wall_s": round(time.perf_counter() - started, 1),
        "config": f"configs/pretrain_{method}.yaml",
        "overrides": overrides,
    }
    partial = done.with_suffix(".partial")  # a killed write never looks finished
    partial.write_text(json.dumps(record, indent=1))
    partial.replace(done)
    return record


def learned_row(
    task: str, row: str, init: str, urls: dict[str, str], out: Path, seed: int,
    budget_s: float, train_roi: list[int],
) -> dict[str, Any]:  # fmt: skip
    """Fine-tune one row for ``budget_s`` of training time, then score its test slab (and, for
    EM, fib_gala_train) at the threshold its validation chose."""
    from neuroray import configs
    from neuroray.config import override
    from neuroray.platform.augment import as_float_image
    from neuroray.segmentation.blockwise import load_segmenter
    from neuroray.segmentation.inference import predict_array, segment_affinities, segment_binary
    from neuroray.segmentation.tasks import get_task
    from neuroray.trainers.finetune import FinetuneJob, finetune

    spec = TASKS[task]
    model = "unet" if row == "unet" else "unetr"
    crop = spec["crops"][model]
    overrides = [
        *SHARED,
        *spec["overrides"],
        *ROW_MODELS[model],
        *(spec["unet"] if model == "unet" else []),
        override("data.image", urls["image"]),
        override("data.labels", urls["labels"]),
        override("data.sampler.crop_shape", crop),
        override("data.sampler.roi", train_roi),
        override("data.sampler.seed", seed),
        *([override("model.encoder.img_size", crop)] if model == "unetr" else []),
        override("model.init", init),
        override("optim.layer_decay", 0.9 if init != "scratch" else None),
        override("validation.roi", spec["validate"]),
        override("run.name", f"{task}_{row}_{train_roi[3]}_seed{seed}"),
        override("run.storage_path", str(out / "runs")),
        override("run.time_budget_s", budget_s),
        override("run.seed", seed),
    ]
    started = time.perf_counter()
    result = finetune(configs.load(FinetuneJob, spec["config"], overrides))
    trained = time.perf_counter() - started
    network, info = load_segmenter(result.checkpoint.path)
    vs = voxel_size(urls["image"])

    def segment(image_url: str, roi: list[int]) -> np.ndarray:
        probs = predict_array(network, as_float_image(read(image_url, roi)), info.window)
        if get_task(task).instances:
            return segment_affinities(probs, [info.threshold], voxel_size=vs)[info.threshold]
        return segment_binary(probs[0], info.threshold)

    t0 = time.perf_counter()
    tests = {"test": score(task, segment(urls["image"], spec["test"]),
                           read(urls["labels"], spec["test"]), vs)}  # fmt: skip
    infer_s = time.perf_counter() - t0
    if "cross" in spec:
        roi = spec["cross"]["roi"]
        tests["cross"] = score(task, segment(urls["cross_image"], roi),
                               read(urls["cross_labels"], roi), vs)  # fmt: skip
    metrics = result.metrics
    test_voxels = int(np.prod(np.subtract(spec["test"][3:], spec["test"][:3])))
    return {
        "name": row_name(row, model, init),
        "model": model,
        "init": init,
        "steps": int(metrics["step"]),
        "trained_s": round(float(metrics["trained_s"]), 1),
        "wall_s": round(trained, 1),
        "samples_per_s": round(float(metrics.get("samples_per_s", 0.0)), 2),
        "threshold": info.threshold,
        "validation": {k: v for k, v in metrics.items() if k.startswith("val_")},
        "test_voxels_per_s": round(test_voxels / infer_s),
        **tests,
        "config": f"configs/{spec['config']}.yaml",
        "overrides": overrides,
    }


def row_name(row: str, model: str, init: str) -> str:
    """'unet scratch', 'mae → unetr', 'unetr dbmim' (a --pretrained NAME=CHECKPOINT row)."""
    if row in PRETRAININGS:
        return PRETRAININGS[row][2]
    return f"{model} {'scratch' if init == 'scratch' else row.removeprefix(model + '-')}"


# ---------------------------------------------------------------------- tables
def label_roi(spec: dict[str, Any], fraction: float) -> list[int]:
    """The contiguous ``fraction`` of the training region a row fine-tunes on: a z slab from the
    first section, or, where sections are too few to cut (mito: 14 of 50 nm), a y-x square from
    the corner of every training section (``low_label_axes``)."""
    roi = list(spec["train"])
    axes = spec.get("low_label_axes", (0,))
    for axis in axes:
        roi[3 + axis] = roi[axis] + round((roi[3 + axis] - roi[axis]) * fraction ** (1 / len(axes)))
    for crop in spec["crops"].values():
        if any(roi[3 + axis] - roi[axis] < crop[axis] for axis in range(3)):
            raise SystemExit(f"em_quality: a label fraction of {fraction:g} leaves {roi}, smaller "
                             f"than the {crop} crop")  # fmt: skip
    return roi


def write_tables(records: list[dict], task: str, label_fraction: float, budget_s: float) -> None:
    """Aggregate finished records into benchmarks/results/<table>.json (rows in run order)."""
    spec = TASKS[task]
    tables = {spec["table"] + ("_low_label" if label_fraction < 1 else ""): "test"}
    if "cross" in spec and label_fraction == 1:
        tables[spec["cross"]["table"]] = "cross"
    keys = ["voi", "voi_split", "voi_merge", "arand"] if task == "em" else ["dice", "iou"]
    for table, part in tables.items():
        rows = write_table(table, part, records, label_fraction=label_fraction, budget_s=budget_s)
        print_table(table, rows, keys)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=os.environ.get("NEURORAY_DATA", "../shared/data"))
    parser.add_argument("--out", default="runs/em_quality")
    parser.add_argument("--task", choices=sorted(TASKS), default="em")
    parser.add_argument("--rows", nargs="*", default=["unet", "unetr"],
                        choices=["unet", "unetr", *PRETRAININGS],
                        help="the baseline row always comes first")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget-min", type=float, default=5.0, help="training minutes per row")
    parser.add_argument("--pretrain-min", type=float, default=15.0,
                        help="pretraining minutes per method and seed")  # fmt: skip
    parser.add_argument("--pretrain-seed", type=int, default=None,
                        help="one pretraining per method for every fine-tuning seed (default: "
                        "each seed pretrains its own)")  # fmt: skip
    parser.add_argument("--pretrain-only", action="store_true",
                        help="run the pretrainings the rows and seeds need, then stop")  # fmt: skip
    parser.add_argument("--pretrained", nargs="*", default=[], metavar="NAME=CHECKPOINT")
    parser.add_argument("--low-label", type=float, default=1.0, help="fraction of training slab")
    parser.add_argument("--overwrite", action="store_true", help="start over in --out")
    args = parser.parse_args()
    out = Path(args.out) / f"{args.task}_{args.low_label:g}"
    spec = TASKS[args.task]
    train_roi = label_roi(spec, args.low_label)  # a fraction too small stops before any work
    budget_s = args.budget_min * 60
    settings = {
        "kind": "em_quality/2",
        "data": str(Path(args.data).resolve()),
        "task": args.task,
        "budget_s": budget_s,
        "pretrain_min": args.pretrain_min,
        **({"pretrain_seed": args.pretrain_seed} if args.pretrain_seed is not None else {}),
        "label_fraction": args.low_label,
    }
    if args.overwrite:
        remove_tree(local_dir(out))
    try:
        check_resume(local_dir(out), settings, what=str(out), overwrite_hint="pass --overwrite")
    except NeurorayError as err:
        raise SystemExit(f"em_quality: {err}") from None
    write_fingerprint(local_dir(out), settings)

    from neuroray.runtime import connect

    connect(object_store_mb=1024, log_to_driver=False)
    try:  # a layer made from other inputs stops here, before any row runs
        urls = ingest_layers(args.data, out.parent / "layers", args.task)
    except NeurorayError as err:
        raise SystemExit(f"em_quality: {err}") from None
    inits = {"unet": "scratch", "unetr": "scratch"}
    inits.update(dict(item.partition("=")[::2] for item in args.pretrained))

    pretrain_runs = Path(args.out) / "pretrain"

    def pretrained(row: str, seed: int) -> dict:
        seed = seed if args.pretrain_seed is None else args.pretrain_seed
        return pretrain(row, urls["pretrain"], pretrain_runs, args.pretrain_min, seed)

    if args.pretrain_only:
        for seed in args.seeds:
            for row in (r for r in args.rows if r in PRETRAININGS):
                print(f"{row} seed {seed}: {pretrained(row, seed)['checkpoint']}")
        return

    log = RowLog(
        out / "rows.jsonl",
        lambda records: write_tables(records, args.task, args.low_label, budget_s),
    )
    log.run("no-learning", 0, lambda: baseline_row(args.task, urls))

    def produce(row: str, seed: int) -> dict:
        if row in PRETRAININGS:
            record = pretrained(row, seed)
            learned = learned_row(args.task, row, f"checkpoint:{record['checkpoint']}", urls,
                                  out, seed, budget_s, train_roi)  # fmt: skip
            return {**learned, "pretraining": {k: v for k, v in record.items() if k != "method"}}
        init = inits[row] if row in ("unet", "unetr") else f"checkpoint:{inits[row]}"
        return learned_row(args.task, row, init, urls, out, seed, budget_s, train_roi)

    for seed in args.seeds:
        for row in [*args.rows, *(item.partition("=")[0] for item in args.pretrained)]:
            log.run(row, seed, lambda row=row, seed=seed: produce(row, seed))


if __name__ == "__main__":
    main()
