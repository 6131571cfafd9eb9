"""Fine-tuning samples/s through the real job (chunk servers, Ray Train, augmentation), side by side.

    PYTHONPATH=. .venv/bin/python benchmarks/finetune_throughput.py [--data ../shared/data] [--steps 40]

Rows, all in one run on the same Ray, each job once as it ran before issue 14 ("before") and once
with the shipped defaults ("after"):

- ``unetr em``: the shipped EM fine-tuning (``configs/finetune_em.yaml``, UNETR) on fib_medulla_s2;
  before = ``run.cpus_per_worker=1`` (one torch thread, the old default);
- ``unet em``: the same job with ``model.name=unet`` (16×96×96 crops, batch 2, as em_quality);
- ``unetr lm``: the shipped LM fine-tuning (``configs/finetune_lm.yaml``: two chunk servers,
  sparse neurons, ``min_foreground``) on DIADEM OP_1–OP_4, encoder from scratch and never frozen
  (what a training step costs, not the 2D weights); before = one CPU and rejecting crops after
  they are served (``data.sampler.foreground_from=labels``), the job that ran at 0.6 samples/s
  and spilled 8.2 GB.

"after" gives the trainer the CPUs Ray has free (the whole laptop). samples/s is Ray Train's own
report over the last half of the steps (the first half includes start-up); MiB spilled is what
Ray moved from the object store to disk during the job. Prints a markdown table with the ratios.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from data_plane import spilled_bytes

UNET = ["model.name=unet", "model.unet.size=small", "data.sampler.crop_shape=[16,96,96]",
        "run.batch_size=2"]  # fmt: skip
LM = ["model.init=scratch", "model.freeze_encoder_steps=0", "data.sampler.roi=null"]
#: row -> (task, shipped config, overrides, the "before" overrides)
ROWS = {
    "unetr em": ("em", "finetune_em", [], ["run.cpus_per_worker=1"]),
    "unet em": ("em", "finetune_em", UNET, ["run.cpus_per_worker=1"]),
    "unetr lm": ("lm", "finetune_lm", LM,
                 ["run.cpus_per_worker=1", "data.sampler.foreground_from=labels"]),
}  # fmt: skip


def layers(data: str, tmp: Path) -> dict[str, tuple[str, str]]:
    """(image, labels) layers per task."""
    from neuroray.platform.ingest import ingest
    from neuroray.platform.lm_data import op_pairs, prepare_lm_stacks

    em = {}
    for name, labels in (("raw", False), ("labels", True)):
        em[name] = str(tmp / "em" / name)
        source = f"{data}/em/fib_medulla_s2.h5#{name}"
        ingest(source, em[name], chunk_shape=(64, 64, 64), labels=labels, progress=False)
    lm = prepare_lm_stacks(op_pairs(data, [1, 2, 3, 4]), tmp / "lm")
    return {"em": (em["raw"], em["labels"]), "lm": (str(lm.image), str(lm.labels))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=os.environ.get("NEURORAY_DATA", "../shared/data"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    args = parser.parse_args()

    from neuroray import configs
    from neuroray.config import override
    from neuroray.runtime import connect
    from neuroray.trainers.finetune import FinetuneJob, finetune

    connect(object_store_mb=1024, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="ft_throughput_"))
    tasks = layers(args.data, tmp)
    measured: dict[tuple[str, str], tuple[float, float]] = {}
    for row in args.rows:
        task, config, row_overrides, before = ROWS[row]
        image, labels = tasks[task]
        for when, when_overrides in (("before", before), ("after", [])):
            overrides = [
                override("data.image", image),
                override("data.labels", labels),
                override("run.storage_path", str(tmp / "runs")),
                override("run.name", f"{row.replace(' ', '_')}_{when}"),
                override("run.steps", args.steps),
                # two reports (with checkpoints): samples/s of each covers half the steps
                override("run.checkpoint_every", args.steps // 2),
                override("run.report_every", args.steps // 2),
                "run.preview_every=1000000",
                "validation.roi=null",
                *row_overrides,
                *when_overrides,
            ]
            spilled = spilled_bytes()
            result = finetune(configs.load(FinetuneJob, config, overrides))
            rate = float(result.metrics_dataframe["samples_per_s"].iloc[-1])
            measured[row, when] = rate, (spilled_bytes() - spilled) / 2**20
            print(f"{row}, {when}: {rate:.2f} samples/s, "
                  f"{measured[row, when][1]:.0f} MiB spilled", flush=True)  # fmt: skip
    print("\n| job | before: samples/s (MiB spilled) | after: samples/s (MiB spilled) | ratio |")
    print("|---|---:|---:|---:|")
    for row in args.rows:
        (one, spill_one), (every, spill_every) = measured[row, "before"], measured[row, "after"]
        print(f"| {row} | {one:.2f} ({spill_one:.0f}) | {every:.2f} ({spill_every:.0f}) "
              f"| {every / one:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
