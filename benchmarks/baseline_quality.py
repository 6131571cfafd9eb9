"""The no-learning baseline on the real data: the first row of every quality table.

    PYTHONPATH=. .venv/bin/python benchmarks/baseline_quality.py --out runs/baseline_quality

Each row is ``neuroray.segmentation.baseline.baseline_summary``: parameters chosen on the
training part only (the held-out part is segmented once and scored), fit and segmentation
wall times measured in the same run. No Ray, no network; about 5 minutes on 2 cores.

- EM neurons, fib_medulla_s2 (10 nm): smoothed intensity -> fragments + waterz; sigma and
  threshold chosen by VOI on z < 200 (the fine-tuning slab z < 170 plus its validation slab
  170-200; ``--em-choose 170`` chooses on z < 170 alone); test z >= 200: VOI, ARAND.
- Mitochondria, vnc_stack1_mito (50 x 4.6 x 4.6 nm): smoothed intensity above or below one
  threshold; sigma, threshold and polarity chosen by Dice on sections 0-15 (train 0-13 plus
  validation 14-15); test sections 16-19: Dice, IoU.
- LM neurons, DIADEM OP_1-OP_4 (choose) / OP_5-OP_6 (test, mean of the two stacks), labels the
  gold SWC rasterised with a 1.5 px radius floor, as benchmarks/lm_quality.py: Dice, IoU.

Expected (measured on the project's 2-core machine): EM VOI 2.71 (split 1.60 / merge 1.11),
ARAND 0.32; mito Dice 0.32 (IoU 0.19); LM Dice 0.19 (IoU 0.10).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def em_row(data: Path, choose_below: int) -> dict:
    from neuroray.platform.volume import open_volume
    from neuroray.segmentation.baseline import baseline_summary

    image = open_volume(f"{data}/em/fib_medulla_s2.h5#raw")
    labels = open_volume(f"{data}/em/fib_medulla_s2.h5#labels")[:]
    raw = image[:]
    row = baseline_summary(
        "em",
        raw[:choose_below],
        labels[:choose_below],
        raw[200:],
        labels[200:],
        image.voxel_size,
    )
    return {"table": "em_neurons", "data": "fib_medulla_s2", "choose": f"z<{choose_below}",
            "test": "z>=200", **row}  # fmt: skip


def mito_row(data: Path) -> dict:
    from neuroray.platform.volume import open_volume
    from neuroray.segmentation.baseline import baseline_summary

    image = open_volume(f"{data}/em/vnc_stack1_mito.h5#raw")
    labels = open_volume(f"{data}/em/vnc_stack1_mito.h5#mitochondria")[:]
    raw = image[:]
    row = baseline_summary("mito", raw[:16], labels[:16], raw[16:], labels[16:], image.voxel_size)
    return {"table": "mito", "data": "vnc_stack1_mito", "choose": "sections 0-15",
            "test": "sections 16-19", **row}  # fmt: skip


def lm_row(data: Path, radius_floor: float) -> dict:
    from neuroray.platform.lm_data import label_mask
    from neuroray.platform.volume import open_volume
    from neuroray.segmentation.baseline import baseline_summary

    def stack(n: int):
        volume = open_volume(f"{data}/lm/OP_{n}.tif")
        image = volume[:]
        gold = label_mask(
            f"{data}/lm/OP_{n}.swc", image.shape, volume.voxel_size, radius_floor_px=radius_floor
        )
        return image, gold, volume.voxel_size

    train = [stack(n) for n in (1, 2, 3, 4)]
    test = [stack(n) for n in (5, 6)]
    row = baseline_summary(
        "lm",
        [image for image, _, _ in train],
        [gold for _, gold, _ in train],
        [image for image, _, _ in test],
        [gold for _, gold, _ in test],
        train[0][2],
    )
    return {"table": "lm", "data": "DIADEM OP", "choose": "OP_1-OP_4", "test": "OP_5-OP_6",
            **row}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=os.environ.get("NEURORAY_DATA", "../shared/data"))
    parser.add_argument("--out", default="runs/baseline_quality")
    parser.add_argument("--em-choose", type=int, default=200, choices=[170, 200])
    parser.add_argument("--radius-floor", type=float, default=1.5)
    parser.add_argument("--only", nargs="+", choices=["em", "mito", "lm"], default=None)
    args = parser.parse_args()

    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    runs = {
        "em": lambda: em_row(data, args.em_choose),
        "mito": lambda: mito_row(data),
        "lm": lambda: lm_row(data, args.radius_floor),
    }
    for name, run in runs.items():
        if args.only and name not in args.only:
            continue
        rows.append(run())
        print(json.dumps(rows[-1]), flush=True)
        (out / "results.json").write_text(json.dumps(rows, indent=2))

    print("\n| table | chosen on | tested on | baseline | VOI (split / merge) | ARAND | Dice | IoU "
          "| fit s | segment s |")  # fmt: skip
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        voi = f"{r['voi']:.3f} ({r['voi_split']:.2f} / {r['voi_merge']:.2f})" if "voi" in r else ""
        arand = f"{r['arand']:.3f}" if "arand" in r else ""
        dice = f"{r['dice']:.3f}" if "dice" in r else ""
        iou = f"{r['iou']:.3f}" if "iou" in r else ""
        print(
            f"| {r['table']} | {r['choose']} | {r['test']} | {r['name']} | {voi} | {arand} | "
            f"{dice} | {iou} | {r['seconds']['fit']:.0f} | {r['seconds']['segment']:.1f} |"
        )


if __name__ == "__main__":
    main()
