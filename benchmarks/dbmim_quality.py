"""Does dbMiM's learned placement help? Tier 1 of issue 15: every arm, five seeds, paired.

    .venv/bin/python benchmarks/dbmim_quality.py --out runs/dbmim_quality [--steps 4000]
    .venv/bin/python benchmarks/dbmim_quality.py --arms rl random --seeds 5 6   # add seeds later
    .venv/bin/python benchmarks/dbmim_quality.py --augment mim --out runs/dbmim_mim  # flips only

Each **arm** pretrains the same MAE (a 128-wide, 4-deep ViT, the encoder of em_quality.py's UNETR
rows) on fib_medulla_s1_raw for ``--steps`` steps from the shipped
``configs/pretrain_dbmim.yaml``, at the same K = 0.75 · N masked patches per crop and the same
alpha schedule; only where the masks fall differs:

- ``rl``: the RLlib policy nominates (the dbMiM game, the RL side on its own CPU);
- ``random``: exactly K at random (plain MAE 0.75, no RL side: the trainer gets both CPUs);
- ``heuristic``: the patches of highest gradient energy nominate;
- ``inverted``: the RL side runs, the trainer nominates what the policy ranks lowest;
- ``random-compute-matched``: random masking for the RL arm's wall time (same seed), i.e. the
  CPU-seconds the RL side spent given to the trainer as extra steps;
- ``scratch``: no pretraining at all (the floor of both scores).

**Scores**, both on fib_medulla_s2, a cube no arm pretrains on, at crops and masks fixed for
every arm and seed: ``probe_ap``, a frozen-encoder linear probe (``neuroray.models.probe``) of
the three nearest-neighbour boundaries (1 - affinity), fitted on crops from z < 170, average
precision on crops from z >= 200; ``heldout_recon``, the MAE loss (normalised pixels) under
*random* K-masks on the z >= 200 crops, which a clever mask choice at pretraining cannot game.

Every (arm, seed) is appended to ``<out>/rows.jsonl`` as it finishes and
``benchmarks/results/dbmim.json`` is rewritten: one row per arm (``name``, ``seeds``, per-seed
``probe_ap``, ``heldout_recon``, ``steps``, ``wall_s``; the ``rl`` row's ``diagnostics``:
within-crop sd of the nomination probability and its Spearman correlations, final policy), and
paired comparisons (``versus``: rl - random, rl - heuristic, inverted - random) with bootstrap
95% intervals over seeds and the smallest difference these seeds could detect (80% power).
Tier 2 (test VOI after fine-tuning) runs through ``em_quality.py --rows
--pretrained rl=<checkpoint> random=<checkpoint>`` with the checkpoints listed here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from quality_tables import RESULTS, RowLog

from neuroray.errors import NeurorayError
from neuroray.platform.provenance import check_resume, local_dir, write_fingerprint
from neuroray.platform.storage import remove_tree

CROP = [16, 64, 64]
SHARED = [  # what every arm changes in the shipped pretrain_dbmim.yaml: size and logging
    "model.encoder.width=128",
    "model.encoder.depth=4",
    "model.encoder.heads=4",
    "data.num_servers=1",
    "run.report_every=25",
    "run.preview_every=1000000",
]
ARMS = {
    "rl": ["masking.name=policy"],
    "random": ["masking.name=random"],
    "heuristic": ["masking.name=heuristic"],
    "inverted": ["masking.name=policy", "masking.invert=true"],
    "random-compute-matched": ["masking.name=random"],
    "scratch": None,
}
COMPARISONS = [("rl", "random"), ("rl", "heuristic"), ("inverted", "random")]
DIAGNOSTICS = ["within_crop_sd", "spearman_heldout_loss", "spearman_gradient_energy",
               "spearman_position", "partial_heldout_loss"]  # fmt: skip
EVAL_SEED = 1234  # the scoring crops and masks: one draw for every arm and seed


# ---------------------------------------------------------------------- scoring data
def scoring_crops(data: str, n_train: int, n_test: int) -> dict[str, np.ndarray]:
    """fib_medulla_s2 crops for the probe (train z < 170, test z >= 200) and their boundaries."""
    from neuroray.platform.augment import as_float_image
    from neuroray.platform.volume import open_volume
    from neuroray.segmentation.targets import seg_to_affinities

    raw = open_volume(f"{data}/em/fib_medulla_s2.h5#raw")[:]
    labels = open_volume(f"{data}/em/fib_medulla_s2.h5#labels")[:]
    rng = np.random.default_rng(EVAL_SEED)

    def draw(n: int, z0: int, z1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        images, boundaries, known = [], [], []
        for _ in range(n):
            z = rng.integers(z0, z1 - CROP[0] + 1)
            y, x = (
                rng.integers(0, s - c + 1) for s, c in zip(raw.shape[1:], CROP[1:], strict=True)
            )
            box = np.s_[z : z + CROP[0], y : y + CROP[1], x : x + CROP[2]]
            affs, mask = seg_to_affinities(labels[box])
            images.append(as_float_image(raw[box])[None])
            boundaries.append(1.0 - affs)
            known.append(mask)
        return np.stack(images), np.stack(boundaries), np.stack(known)

    train_x, train_y, _ = draw(n_train, 0, 170)
    test_x, test_y, test_known = draw(n_test, 200, raw.shape[0])
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y,
            "test_known": test_known}  # fmt: skip


def score(mae, crops: dict[str, np.ndarray], ratio: float, seed: int) -> dict[str, float]:
    """probe_ap and heldout_recon of one MAE (see the module docstring)."""
    import torch

    from neuroray.masking import RandomMasker
    from neuroray.models.probe import average_precision, fit_probe, token_features

    encoder = mae.encoder
    grid = encoder.grid
    train = token_features(encoder, torch.from_numpy(crops["train_x"]))
    test = token_features(encoder, torch.from_numpy(crops["test_x"]))
    probe = fit_probe(train, torch.from_numpy(crops["train_y"]), grid, encoder.patch_size,
                      seed=seed)  # fmt: skip
    with torch.no_grad():
        logits = probe(test, grid).numpy()
    known = crops["test_known"] > 0
    ap = average_precision(logits[known], crops["test_y"][known])

    masks = RandomMasker(ratio=ratio).mask(
        (len(crops["test_x"]), *grid), np.random.default_rng(EVAL_SEED)
    )
    mae.eval()
    with torch.no_grad():
        out = mae(torch.from_numpy(crops["test_x"]), torch.from_numpy(masks))
    return {"probe_ap": round(ap, 4), "heldout_recon": round(float(out.loss), 4)}


# ---------------------------------------------------------------------- arms
def pretrain_arm(
    arm: str, image: str, out: Path, steps: int, seed: int, budget_s: float | None,
    augment: str | None = None,
):  # fmt: skip
    """Pretrain one arm; its checkpoint, MAE model, record and job overrides."""
    from neuroray import configs
    from neuroray.agents.dbmim import DbMiMJob, run_dbmim
    from neuroray.config import override

    overrides = [
        *SHARED,
        *ARMS[arm],
        override("data.image", image),
        override("data.sampler.seed", seed),
        override("run.name", f"dbmim_{arm}_seed{seed}"),
        override("run.storage_path", str(out / "runs")),
        override("run.seed", seed),
        override("rl.seed", seed),
        *([override("data.augment", augment)] if augment else []),
        *([override("run.steps", 1_000_000), override("run.checkpoint_every", 1_000_000),
           override("run.time_budget_s", budget_s)] if budget_s else
          [override("run.steps", steps), override("run.checkpoint_every", steps)]),
    ]  # fmt: skip
    job = configs.load(DbMiMJob, "pretrain_dbmim", overrides)
    t0 = time.perf_counter()
    result = run_dbmim(job)
    wall = time.perf_counter() - t0
    metrics = result.metrics
    record = {
        "steps": int(metrics["step"]),
        "wall_s": round(wall, 1),
        "checkpoint": result.checkpoint.path,
        "config": "configs/pretrain_dbmim.yaml",
        "overrides": overrides,
    }
    if arm in ("rl", "inverted"):
        record["diagnostics"] = {k: metrics.get(f"rl/diag_{k}") for k in DIAGNOSTICS}
        record["rl_iterations"] = metrics.get("rl/iterations")
    return load_mae(result.checkpoint.path), record


def load_mae(checkpoint: str):
    """The whole MAE (encoder and decoder) of a pretraining checkpoint."""
    from neuroray.models.checkpoint import load_model_checkpoint
    from neuroray.models.mae import MAEConfig, build_mae3d

    saved = load_model_checkpoint(checkpoint)
    mae = build_mae3d(MAEConfig.model_validate(json.loads(saved["job"])["model"]))
    mae.load_state_dict(saved["state_dict"])
    return mae


def scratch_mae(seed: int):
    """An untrained MAE of the arms' architecture: the floor."""
    import torch

    from neuroray import configs
    from neuroray.agents.dbmim import DbMiMJob
    from neuroray.models.mae import build_mae3d

    torch.manual_seed(seed)
    job = configs.load(DbMiMJob, "pretrain_dbmim", [*SHARED, "data.image=unused"])
    return build_mae3d(job.model)


# ---------------------------------------------------------------------- table
def paired(a: list[float], b: list[float], rng: np.random.Generator) -> dict[str, Any]:
    """Mean of a - b over paired seeds, its bootstrap 95% interval, and the smallest difference
    these seeds could detect (two-sided 5%, 80% power: 2.8 standard errors)."""
    diff = np.subtract(a, b)
    means = diff[rng.integers(0, len(diff), (10_000, len(diff)))].mean(1)
    se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else None  # JSON has no NaN
    return {"mean": round(float(diff.mean()), 4), "n": len(diff),
            "ci95": [round(float(q), 4) for q in np.percentile(means, [2.5, 97.5])],
            "min_detectable": None if se is None else round(float(2.8 * se), 4)}  # fmt: skip


def sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def write_results(records: list[dict]) -> list[dict]:
    rows: dict[str, dict] = {}
    for rec in records:
        row = rows.setdefault(rec["row"], {"name": rec["row"], "seeds": [], "probe_ap": [],
                                           "heldout_recon": [], "steps": [], "wall_s": [],
                                           "checkpoints": [], "config": rec.get("config"),
                                           "overrides": rec.get("overrides", [])})  # fmt: skip
        row["seeds"].append(rec["seed"])
        for key in ("probe_ap", "heldout_recon", "steps", "wall_s"):
            row[key].append(rec.get(key))
        row["checkpoints"].append(rec.get("checkpoint"))
        if "diagnostics" in rec:
            for key, value in rec["diagnostics"].items():
                row.setdefault("diagnostics", {}).setdefault(key, []).append(value)
    rng = np.random.default_rng(0)
    for a, b in COMPARISONS:
        if a in rows and b in rows:
            seeds = sorted(set(rows[a]["seeds"]) & set(rows[b]["seeds"]))
            if not seeds:
                continue
            pick = {name: [rows[name]["seeds"].index(s) for s in seeds] for name in (a, b)}
            rows[a].setdefault("versus", {})[b] = {
                key: paired([rows[a][key][i] for i in pick[a]],
                            [rows[b][key][i] for i in pick[b]], rng)
                for key in ("probe_ap", "heldout_recon")
            }  # fmt: skip
    out = list(rows.values())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dbmim.json").write_text(json.dumps(out, indent=2) + "\n")
    print("\n| arm | seeds | probe AP (↑) | held-out recon (↓) | steps | wall s |")
    print("|---|---|---:|---:|---:|---:|")
    for row in out:
        ap, recon = row["probe_ap"], row["heldout_recon"]
        print(f"| {row['name']} | {len(row['seeds'])} | {statistics.fmean(ap):.4f} ± {sd(ap):.4f} "
              f"| {statistics.fmean(recon):.4f} ± {sd(recon):.4f} | {row['steps'][0]} "
              f"| {statistics.fmean(row['wall_s']):.0f} |")  # fmt: skip
        for other, stats in row.get("versus", {}).items():
            print(f"|   {row['name']} − {other} | {stats['probe_ap']['n']} "
                  f"| {stats['probe_ap']['mean']:+.4f} {stats['probe_ap']['ci95']} "
                  f"(detectable {stats['probe_ap']['min_detectable']}) "
                  f"| {stats['heldout_recon']['mean']:+.4f} {stats['heldout_recon']['ci95']} | | |")  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=os.environ.get("NEURORAY_DATA", "../shared/data"))
    parser.add_argument("--out", default="runs/dbmim_quality")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    # MAE on this cube sits on the trivial plateau (loss ~1.0) for its first ~1,200 steps at
    # batch 8: at 2,000 (cosine to zero) every arm's held-out loss was still 0.998-0.999
    parser.add_argument("--steps", type=int, default=4000, help="pretraining steps per arm")
    parser.add_argument("--augment", default=None, metavar="PIPELINE",
                        help="every arm's data.augment (a named pipeline such as em or mim; "
                             "default: the shipped config's)")  # fmt: skip
    parser.add_argument("--probe-crops", type=int, nargs=2, default=[64, 32],
                        metavar=("TRAIN", "TEST"))  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="start over in --out")
    args = parser.parse_args()
    if "random-compute-matched" in args.arms and "rl" not in args.arms:
        raise SystemExit("dbmim_quality: random-compute-matched needs the rl arm (its wall time)")
    out = Path(args.out)
    settings = {"kind": "dbmim_quality/1", "data": str(Path(args.data).resolve()),
                "steps": args.steps, "probe_crops": args.probe_crops,
                **({"augment": args.augment} if args.augment else {})}  # fmt: skip
    if args.overwrite:
        remove_tree(local_dir(out))
    try:
        check_resume(local_dir(out), settings, what=str(out), overwrite_hint="pass --overwrite")
    except NeurorayError as err:
        raise SystemExit(f"dbmim_quality: {err}") from None
    write_fingerprint(local_dir(out), settings)

    from neuroray.platform.ingest import ingest
    from neuroray.runtime import connect

    connect(object_store_mb=1024, log_to_driver=False)
    image = str(out / "layers" / "medulla_s1_raw")
    try:  # resumes a finished layer; one made from other inputs stops here, before any arm
        ingest(f"{args.data}/em/fib_medulla_s1_raw.h5#raw", image, chunk_shape=(64, 64, 64),
               progress=False)  # fmt: skip
        crops = scoring_crops(args.data, *args.probe_crops)
    except NeurorayError as err:
        raise SystemExit(f"dbmim_quality: {err}") from None
    log = RowLog(out / "rows.jsonl", write_results)
    ratio = 0.75

    def produce(arm: str, seed: int) -> dict[str, Any]:
        if arm == "scratch":
            return {**score(scratch_mae(seed), crops, ratio, seed), "steps": 0, "wall_s": 0.0}
        budget = None
        if arm == "random-compute-matched":
            budget = next(
                r["wall_s"] for r in log.records if r["row"] == "rl" and r["seed"] == seed
            )
        mae, record = pretrain_arm(arm, image, out, args.steps, seed, budget, args.augment)
        return {**score(mae, crops, ratio, seed), **record}

    order = sorted(args.arms, key=lambda arm: arm == "random-compute-matched")  # after rl
    for seed in args.seeds:
        for arm in order:
            log.run(arm, seed, lambda arm=arm, seed=seed: produce(arm, seed))


if __name__ == "__main__":
    main()
